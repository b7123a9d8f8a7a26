"""CART in FusionBench 0.2.33, and the baselines against FusionBench's own code.

* ``CARTAlgorithm`` / ``LowRankMergeAlgorithm`` run on a ``BaseModelPool`` and
  through the ``fusion_bench`` CLI (``method._target_=...`` and the shipped
  YAML config), giving the tensors of lowrank_merge.
* ``task_arithmetic``, ``tsv``, ``iso_c`` and ``iso_cts`` agree with
  FusionBench's implementations (every 2-D tensor decomposed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _integration import TinyMLP, max_abs_diff, require

require("fusion_bench")

import lowrank_merge as lm  # noqa: E402
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts  # noqa: E402
from fusion_bench.method import TaskArithmeticAlgorithm  # noqa: E402
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction  # noqa: E402
from fusion_bench.modelpool import BaseModelPool  # noqa: E402
from lowrank_merge.integrations.fusion_bench import CARTAlgorithm, LowRankMergeAlgorithm  # noqa: E402

HERE = Path(__file__).parent


def tiny_pool(T: int = 3) -> tuple[TinyMLP, list[TinyMLP]]:
    torch.manual_seed(0)
    base = TinyMLP()
    tasks = []
    for _ in range(T):
        task = TinyMLP()
        task.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
        tasks.append(task)
    return base, tasks


def test_cart_algorithm_runs_on_a_model_pool():
    base, tasks = tiny_pool()
    pool = BaseModelPool({"_pretrained_": base, **{f"task_{i}": task for i, task in enumerate(tasks)}})
    merged = CARTAlgorithm(rank_ratio=0.25, scale=1.5).run(pool)
    expected = lm.cart_merge([t.state_dict() for t in tasks], rank_ratio=0.25, scale=1.5)
    assert max_abs_diff(merged.state_dict(), expected) == 0.0
    assert merged is not base and torch.equal(base.fc1.weight, tiny_pool()[0].fc1.weight)  # pool left untouched
    iso = LowRankMergeAlgorithm("iso_cts", common_fraction=0.5).run(pool)
    expected = lm.merge([t.state_dict() for t in tasks], "iso_cts", base=base.state_dict(), common_fraction=0.5)
    assert max_abs_diff(iso.state_dict(), expected) == 0.0
    with pytest.raises(ValueError, match="density must be in"):
        LowRankMergeAlgorithm("ties", density=2.0)


def test_dtypes_by_name_as_hydra_passes_them():
    base, tasks = tiny_pool()
    pool = BaseModelPool({f"task_{i}": task for i, task in enumerate(tasks)})
    merged = LowRankMergeAlgorithm("cart", compute_dtype="float64", out_dtype="bfloat16", rank_ratio=0.25).run(pool)
    expected = lm.cart_merge(
        [t.state_dict() for t in tasks], rank_ratio=0.25, compute_dtype=torch.float64, out_dtype=torch.bfloat16
    )
    assert all(torch.equal(merged.state_dict()[name], tensor.to(torch.float32)) for name, tensor in expected.items())
    with pytest.raises(ValueError, match="dtype \\(the compute dtype\\) must be float32 or float64, got 'float16'"):
        LowRankMergeAlgorithm("cart", compute_dtype="float16")


def test_missing_base_is_reported_before_any_model_loads():
    _, tasks = tiny_pool()
    pool = BaseModelPool({f"task_{i}": task for i, task in enumerate(tasks)})
    loaded = []
    pool.load_model = lambda name, *args, **kwargs: loaded.append(name)
    with pytest.raises(ValueError, match="merge method 'tsv' needs base="):
        LowRankMergeAlgorithm("tsv").run(pool)
    assert loaded == []


@pytest.mark.parametrize(
    "method_arguments",
    [
        ["method._target_=lowrank_merge.integrations.fusion_bench.CARTAlgorithm", "+method.rank_ratio=0.25"],
        [
            "hydra.searchpath=[pkg://lowrank_merge.integrations.fusion_bench_config]",
            "method=lowrank_merge/cart",
            "method.rank_ratio=0.25",
        ],
    ],
    ids=["target", "yaml"],
)
def test_fusion_bench_cli_runs_cart(tmp_path: Path, method_arguments: list[str]):
    base, tasks = tiny_pool(2)
    paths = {"_pretrained_": tmp_path / "base.pt", "task_a": tmp_path / "a.pt", "task_b": tmp_path / "b.pt"}
    for model, path in zip([base, *tasks], paths.values()):
        torch.save(model.state_dict(), path)
    (tmp_path / "conf" / "modelpool").mkdir(parents=True)
    entries = "".join(f"  {name}: {{_target_: _integration.load_tiny, path: {path}}}\n" for name, path in paths.items())
    (tmp_path / "conf" / "modelpool" / "tiny.yaml").write_text(
        f"_target_: fusion_bench.modelpool.BaseModelPool\nmodels:\n{entries}"
    )
    command = [
        str(Path(sys.executable).with_name("fusion_bench")),
        "--config-dir", str(tmp_path / "conf"),
        "modelpool=tiny", "taskpool=dummy", f"merged_model_save_path={tmp_path / 'merged.pt'}",
        *method_arguments,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert max_abs_diff(merged, lm.cart_merge([t.state_dict() for t in tasks], rank_ratio=0.25)) == 0.0


def task_vectors(base: TinyMLP, tasks: list[TinyMLP]) -> list[dict]:
    return [{k: v - base.state_dict()[k] for k, v in t.state_dict().items()} for t in tasks]


def plus(base: TinyMLP, scale: float, vector: dict) -> dict:
    return {k: v + scale * vector[k] for k, v in base.state_dict().items()}


@pytest.mark.parametrize("method", ["task_arithmetic", "tsv", "iso_c", "iso_cts"])
def test_baselines_agree_with_fusion_bench(method):
    base, tasks = tiny_pool(3)
    scale = 0.7
    states = [t.state_dict() for t in tasks]
    options = {} if method == "task_arithmetic" else {"exclude": (), "svd": "exact"}  # every 2-D tensor, as FusionBench
    ours = lm.merge(states, method, base=base.state_dict(), scale=scale, **options)
    if method == "task_arithmetic":
        pool = BaseModelPool({"_pretrained_": base, **{f"task_{i}": task for i, task in enumerate(tasks)}})
        theirs = TaskArithmeticAlgorithm(scaling_factor=scale).run(pool).state_dict()
    else:
        vectors = task_vectors(base, tasks)
        merged_vector = {
            "tsv": lambda: compute_and_sum_svd_mem_reduction(vectors, accelerator="cpu"),
            "iso_c": lambda: iso_c(vectors, accelerator="cpu"),
            "iso_cts": lambda: iso_cts(vectors, common_space_fraction=0.8, accelerator="cpu"),
        }[method]()
        theirs = plus(base, scale, merged_vector)
    diff = max_abs_diff(ours, theirs)
    print(f"{method}: max abs diff vs FusionBench {diff:.3g}")
    assert diff <= 1e-5
