"""lowrank_merge: fast, exact-to-the-method CART model merging.

CART (Choi et al. 2024, "Revisiting Weight Averaging for Model Merging",
arXiv 2412.12153): θ = θ_avg + λ · Σ_t SVD_k(θ_t − θ_avg) for each selected
2-D weight, θ_avg for every other tensor.
"""

from ._ops import extension_available
from .engines import ENGINES
from .merge import (
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
from .selection import DEFAULT_EXCLUDE, KEY_PRESETS, REFERENCE_EXCLUDE, REFERENCE_INCLUDE, key_preset, rank_for

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_NITER",
    "DEFAULT_RANK_RATIO",
    "DEFAULT_SCALE",
    "ENGINES",
    "KEY_PRESETS",
    "REFERENCE_EXCLUDE",
    "REFERENCE_INCLUDE",
    "CartDeltas",
    "MergeSettings",
    "cart_decompose",
    "cart_layer",
    "cart_layer_parts",
    "cart_merge",
    "extension_available",
    "key_preset",
    "low_rank_approx",
    "merge_tensor",
    "plan_tensor",
    "rank_for",
]
