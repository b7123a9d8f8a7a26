"""An offline multi-task merging benchmark (``lowrank-merge demo``).

T image-classification tasks built from data that ships inside PyPI packages
(:mod:`.data`), a small ViT with CLIP's parameter names (:mod:`.model`),
pretrained once and fine-tuned per task (:mod:`.train`), merged with every
method of :mod:`lowrank_merge.methods` and scored per task (:mod:`.benchmark`).
Needs the ``eval`` extra: ``pip install "lowrank_merge[eval]"``.
"""

from .benchmark import BenchmarkConfig, BenchmarkResult, run_benchmark
from .data import DEFAULT_TASKS, TASK_SOURCES, Task, build_task
from .model import ViTConfig, VisionTransformer
from .report import markdown_report, plot_rank_curve, write_json
from .train import TrainingConfig

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "DEFAULT_TASKS",
    "TASK_SOURCES",
    "Task",
    "TrainingConfig",
    "ViTConfig",
    "VisionTransformer",
    "build_task",
    "markdown_report",
    "plot_rank_curve",
    "run_benchmark",
    "write_json",
]
