"""Per-tensor merges in the shape of ``peft.utils.merge_utils``.

``cart``, ``tsv``, ``iso_c`` and ``iso_cts`` take ``task_tensors`` (T tensors
of one shape: LoRA deltas ``B @ A · scaling``, adapter weights or task
vectors) and ``weights`` (``[T]``), like PEFT's ``task_arithmetic`` /
``ties``, and return the merged tensor. As in PEFT, each task tensor is first
multiplied by its weight. Needs nothing but torch; PEFT itself is not imported.

    from lowrank_merge.integrations.peft import cart
    deltas = [module.get_delta_weight(name) for name in adapters]  # peft LoRA layers
    merged_delta = cart(deltas, torch.ones(len(deltas)), rank_ratio=0.25, scale=2.0)

The inputs are task vectors (no base): ``tsv``, ``iso_c`` and ``iso_cts``
merge them as Δ_t; ``cart`` returns mean(Δ) + scale · Σ_t SVD_k(Δ_t − mean(Δ)),
which is CART's merged model minus the base (the base cancels out). Every 2-D
tensor gets the SVD treatment (there are no names to filter); other shapes
get the method's non-matrix rule. Keyword options as
:func:`lowrank_merge.merge` (``svd``, ``niter``, ``oversample``, ``seed``,
``device``, ``compute_dtype``, ``out_dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..cart import DEFAULT_RANK_RATIO, DEFAULT_SCALE
from ..methods import (
    ISO_C_SCALE,
    ISO_CTS_COMMON_FRACTION,
    ISO_CTS_SCALE,
    TSV_SCALE,
    merge_method_tensor,
    method_settings,
)


def cart(
    task_tensors: Sequence[Tensor],
    weights: Tensor | Sequence[float],
    rank_ratio: float = DEFAULT_RANK_RATIO,
    scale: float = DEFAULT_SCALE,
    **options: object,
) -> Tensor:
    """CART (Choi et al. 2024) of T task tensors; ``rank`` may replace ``rank_ratio``."""
    return _merge("cart", task_tensors, weights, rank_ratio=rank_ratio, scale=scale, **options)


def tsv(
    task_tensors: Sequence[Tensor],
    weights: Tensor | Sequence[float],
    rank_ratio: float | None = None,
    scale: float = TSV_SCALE,
    **options: object,
) -> Tensor:
    """TSV-M (Gargiulo et al. 2025); per-task rank floor(min(m, n)/T) unless ``rank_ratio``/``rank`` say less."""
    return _merge("tsv", task_tensors, weights, rank_ratio=rank_ratio, scale=scale, **options)


def iso_c(
    task_tensors: Sequence[Tensor], weights: Tensor | Sequence[float], scale: float = ISO_C_SCALE, **options: object
) -> Tensor:
    """Iso-C (Marczak et al. 2025): the summed task matrix with a flat spectrum."""
    return _merge("iso_c", task_tensors, weights, scale=scale, **options)


def iso_cts(
    task_tensors: Sequence[Tensor],
    weights: Tensor | Sequence[float],
    common_fraction: float = ISO_CTS_COMMON_FRACTION,
    scale: float = ISO_CTS_SCALE,
    **options: object,
) -> Tensor:
    """Iso-CTS (Marczak et al. 2025): common plus task-specific subspaces, flat spectrum."""
    return _merge("iso_cts", task_tensors, weights, common_fraction=common_fraction, scale=scale, **options)


def _merge(method: str, task_tensors: Sequence[Tensor], weights: Tensor | Sequence[float], **params: object) -> Tensor:
    # One unnamed tensor: it is always decomposed, so no key filter applies.
    for key in ("include", "exclude"):
        if key in params:
            raise TypeError(f"{method}() takes no {key}: it merges one tensor, which has no name to filter on")
    settings = method_settings(method, exclude=(), **params)
    tensors = _weighted(task_tensors, weights)
    base = torch.zeros_like(tensors[0]) if settings.spec.needs_base else None
    labels = [f"task tensor {index}" for index in range(len(tensors))]
    return merge_method_tensor("", tensors, base, settings, labels)


def _weighted(task_tensors: Sequence[Tensor], weights: Tensor | Sequence[float]) -> list[Tensor]:
    """``w_t · τ_t`` for each task (PEFT's weighting), after checking the shapes."""
    if isinstance(task_tensors, Tensor) or len(task_tensors) == 0:
        raise ValueError("task_tensors must be a non-empty list of tensors")
    weights = torch.as_tensor(weights)
    if weights.shape != (len(task_tensors),):
        raise ValueError(
            f"weights must have shape [{len(task_tensors)}] (one per task tensor), got {list(weights.shape)}"
        )
    shape = task_tensors[0].shape
    for index, tensor in enumerate(task_tensors):
        if tensor.shape != shape:
            raise ValueError(f"task tensor {index} has shape {list(tensor.shape)} but task tensor 0 has {list(shape)}")
    return [tensor * weight.to(tensor.dtype) for tensor, weight in zip(task_tensors, weights)]
