"""lowrank_merge: fast, exact-to-the-method CART model merging.

CART (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging",
arXiv 2412.12153): θ = θ_avg + λ · Σ_t SVD_k(θ_t − θ_avg) for each selected
2-D weight, θ_avg for every other tensor.

``lowrank_merge.merge(models, method=..., base=None, **params)`` runs CART or a
baseline (``average``, ``task_arithmetic``, ``ties``, ``tsv``, ``iso_c``,
``iso_cts``) through one API; see :mod:`lowrank_merge.methods`.
``lowrank_merge.tune(models, evaluate, ...)`` grid-searches CART's rank ratio
and λ on a validation score for about the cost of one merge.
"""

from ._ops import extension_available, set_cpu_matmul_backend
from .cart import (
    DEFAULT_NITER,
    DEFAULT_RANK_RATIO,
    DEFAULT_SCALE,
    CartDeltas,
    MergeSettings,
    cart_decompose,
    cart_layer,
    cart_layer_parts,
    cart_merge,
    low_rank_approx,
    merge_tensor,
    plan_tensor,
)
from .engines import CPU_MATMUL_BACKENDS, ENGINES, cpu_matmul_backend
from .methods import (
    METHODS,
    MethodSettings,
    MethodSpec,
    check_base,
    get_method,
    merge,
    merge_method_tensor,
    method_settings,
    prepare,
)
from .selection import DEFAULT_EXCLUDE, KEY_PRESETS, REFERENCE_EXCLUDE, REFERENCE_INCLUDE, key_preset, rank_for
from .tuning import DEFAULT_TUNE_RANK_RATIOS, DEFAULT_TUNE_SCALES, TuneResult, tune


__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_NITER",
    "DEFAULT_RANK_RATIO",
    "DEFAULT_SCALE",
    "DEFAULT_TUNE_RANK_RATIOS",
    "DEFAULT_TUNE_SCALES",
    "ENGINES",
    "KEY_PRESETS",
    "METHODS",
    "REFERENCE_EXCLUDE",
    "REFERENCE_INCLUDE",
    "CPU_MATMUL_BACKENDS",
    "CartDeltas",
    "MergeSettings",
    "MethodSettings",
    "MethodSpec",
    "TuneResult",
    "cart_decompose",
    "cart_layer",
    "cart_layer_parts",
    "cart_merge",
    "check_base",
    "cpu_matmul_backend",
    "extension_available",
    "get_method",
    "key_preset",
    "low_rank_approx",
    "merge",
    "merge_method_tensor",
    "merge_tensor",
    "method_settings",
    "plan_tensor",
    "prepare",
    "rank_for",
    "set_cpu_matmul_backend",
    "tune",
]
