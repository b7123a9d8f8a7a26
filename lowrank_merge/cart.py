"""CART: the one place that decides the math of a merge.

θ = θ_avg + λ · Σ_t SVD_k(θ_t − θ_avg) for each selected 2-D weight, θ_avg for
every other floating tensor (Choi et al., "Revisiting Weight Averaging for
Model Merging", arXiv 2412.12153).

The unit of work is one tensor name across the T models
(:func:`merge_tensor`); :func:`cart_merge` runs it over in-memory state
dicts and the checkpoint streamer runs it over tensors read from disk, so both
give the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager as ContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor, nn

from . import _ops
from .engines import (
    SKETCH_ENGINES,
    engine_cost,
    gaussian_sketch,
    sketch_width,
    sum_of_reconstructions,
    task_average,
)
from .selection import KeyFilter, rank_for
from .validation import (
    TensorMeta,
    all_finite,
    check_compatible,
    check_merge_parameters,
    check_scale,
    check_tensor_values,
)

#: The CART paper's headline rank ratio (about 8 % of min(m, n)).
DEFAULT_RANK_RATIO = 0.08
#: λ of the reference configuration for 8 ViT-B/32 tasks; the paper's configs
#: use 1.5–2.0 for vision and 1.3–1.6 for language models.
DEFAULT_SCALE = 2.0
#: Power (or Krylov) iterations of the randomized and krylov engines on A: 2
#: keeps the residual within 2 % of the optimal rank-k residual on slowly
#: decaying spectra (0.1–1.6 % measured, benchmarks/results/engines_cpu_2026-11-23.md).
DEFAULT_NITER = 2
#: Iterations of the accurate engines (``gram_subspace``, ``chebyshev``, and
#: ``auto`` with whichever of them it picks). ``gram_subspace``'s
#: Chebyshev-filtered iteration with 3 products brings the rank-k sum within
#: ~1e-3 of the float64 dense one on 1/i spectra at 8 % rank, about what a float32
#: dense SVD gets (and what plain subspace iteration got with 5; 2 gave 4e-3 to
#: 9e-3). ``chebyshev``, the same filter applied through A, starts half a step
#: behind (from A Ω, not G Ω) and needs 4 for the accuracy that ``randomized``'s
#: plain iteration reached with 5 (benchmarks/NOTES.md, 2026-12-02 and the fifth
#: session of 2026-12-03).
ACCURATE_NITER = {"gram_subspace": 3, "chebyshev": 4}
#: Extra sketch columns beyond k: 10 for subspace iteration (Halko et al.),
#: none for block Krylov, whose extra blocks already widen the space.
DEFAULT_OVERSAMPLE = {"randomized": 10, "krylov": 0}
#: What ``svd="auto"`` runs, per layer: ``gram_subspace`` or ``chebyshev``,
#: whichever :func:`lowrank_merge.engines.engine_cost` predicts cheaper, each
#: with its ``ACCURATE_NITER`` iterations and :func:`accurate_oversample` columns.
AUTO_CANDIDATES = ("gram_subspace", "chebyshev")


def accurate_oversample(k: int) -> int:
    """Extra sketch columns of ``gram_subspace``, ``chebyshev`` and ``auto``: ``max(10, k // 2)``.

    Proportional to k because what sets the convergence of the k-th singular
    vector is σ_{l+1}/σ_k, about k / l on slowly decaying spectra.
    """
    return max(10, k // 2)


StateDict = Mapping[str, Tensor]
ModelLike = StateDict | nn.Module
#: Top-k SVD factors of a centered stack: ``U [T, m, k]``, ``S [T, k]``, ``Vh [T, k, n]``.
Factors = tuple[Tensor, Tensor, Tensor]
_Part = TypeVar("_Part")
_Item = TypeVar("_Item")


@dataclass(frozen=True)
class MergeSettings:
    """Validated parameters of a CART merge (build with :meth:`create`)."""

    rank_ratio: float = DEFAULT_RANK_RATIO
    rank: int | None = None
    scale: float = DEFAULT_SCALE
    key_filter: KeyFilter = field(default_factory=lambda: KeyFilter.build(None, None))
    svd: str = "auto"
    #: None: the engine's default (``DEFAULT_NITER`` or ``ACCURATE_NITER``).
    niter: int | None = None
    #: None: the engine's default, which can depend on k (see :meth:`layer_engine`).
    oversample: int | None = None
    seed: int = 0
    device: torch.device | None = None
    compute_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype | None = None

    @classmethod
    def create(
        cls,
        *,
        rank_ratio: float = DEFAULT_RANK_RATIO,
        rank: int | None = None,
        scale: float = DEFAULT_SCALE,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        svd: str = "auto",
        niter: int | None = None,
        oversample: int | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype = torch.float32,
        out_dtype: torch.dtype | None = None,
    ) -> "MergeSettings":
        check_merge_parameters(
            rank_ratio=rank_ratio, rank=rank, scale=scale, svd=svd, niter=niter, oversample=oversample, seed=seed
        )
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}; "
                "half-precision inputs are upcast, never decomposed in half precision"
            )
        if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise ValueError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
        return cls(
            rank_ratio=float(rank_ratio),
            rank=rank,
            scale=float(scale),
            key_filter=KeyFilter.build(include, exclude),
            svd=svd,
            niter=None if niter is None else int(niter),
            oversample=None if oversample is None else int(oversample),
            seed=int(seed),
            device=None if device is None else torch.device(device),
            compute_dtype=compute_dtype,
            out_dtype=out_dtype,
        )

    def rank_of(self, shape: Sequence[int]) -> int:
        return rank_for(shape, self.rank_ratio, self.rank)

    def is_low_rank(self, name: str, meta: TensorMeta) -> bool:
        return self.key_filter.is_low_rank(name, meta.shape, meta.dtype)

    def layer_engine(self, m: int, n: int, k: int) -> tuple[str, int, int]:
        """``(engine, niter, sketch width)`` for an ``[m, n]`` layer at rank ``k``.

        Explicit ``niter`` / ``oversample`` win; otherwise ``randomized`` and
        ``krylov`` take ``DEFAULT_NITER`` / ``DEFAULT_OVERSAMPLE``, and
        ``gram_subspace``, ``chebyshev`` and ``auto`` the accurate ones. ``auto`` then runs
        whichever of ``AUTO_CANDIDATES`` is predicted cheaper for this shape and rank.
        """
        accurate = self.svd in ("auto", *ACCURATE_NITER)

        def iterations(engine: str) -> int:
            if self.niter is not None:
                return self.niter
            return ACCURATE_NITER[engine] if accurate else DEFAULT_NITER

        if self.oversample is not None:
            oversample = self.oversample
        else:
            oversample = accurate_oversample(k) if accurate else DEFAULT_OVERSAMPLE.get(self.svd, 0)
        width = sketch_width(k, oversample, m, n)
        engine = self.svd
        if engine == "auto":
            engine = min(AUTO_CANDIDATES, key=lambda name: engine_cost(name, m, n, k, iterations(name), width))
        return engine, iterations(engine), width


# ---------------------------------------------------------------------------
# Per layer
# ---------------------------------------------------------------------------


def _sketch_for(A: Tensor, k: int, settings: MergeSettings) -> tuple[str, int, Tensor | None]:
    """``(engine, niter, omega)`` of ``A [..., m, n]`` at rank k: the seeded
    Gaussian sketch ``[n, width]`` for the sketch engines, None otherwise."""
    m, n = A.shape[-2:]
    engine, niter, width = settings.layer_engine(m, n, k)
    if engine not in SKETCH_ENGINES:
        return engine, niter, None
    return engine, niter, gaussian_sketch(n, width, settings.seed, A.dtype, A.device)


def _check_rank(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _check_stack(stack: Tensor, k: int) -> None:
    if not isinstance(stack, Tensor) or stack.dim() != 3 or not stack.dtype.is_floating_point:
        raise ValueError(f"stack must be a floating tensor of shape [T, m, n], got {_describe(stack)}")
    _check_rank(k)
    check_tensor_values("stack", stack.unbind(0), [f"task {t}" for t in range(stack.shape[0])])


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


@torch.no_grad()
def cart_layer_parts(
    stack: Tensor,
    k: int,
    *,
    svd: str = "auto",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The average ``[m, n]`` and low-rank sum ``[m, n]`` of one layer.

    ``stack`` is ``[T, m, n]`` (any floating dtype); results are in
    ``compute_dtype``. The merged layer for any λ is ``average + λ * delta``, so
    several λ values can be tried without decomposing again.
    """
    _check_stack(stack, k)
    settings = MergeSettings.create(svd=svd, niter=niter, oversample=oversample, seed=seed, compute_dtype=compute_dtype)
    return _layer_parts(stack.to(compute_dtype), min(k, *stack.shape[-2:]), settings)


def _delta_is_zero(shape: Sequence[int], k: int) -> bool:
    """With one model, or at full rank, Σ_t τ̄_t = 0 exactly: the work is skipped."""
    T, m, n = shape
    return T == 1 or k >= min(m, n)


def _layer_description(stack: Tensor, k: int, settings: MergeSettings, name: str | None) -> str:
    T, m, n = stack.shape
    layer = f"layer {name!r}" if name is not None else "a layer"
    return f"{layer} (T={T} tasks of {m} x {n}, k={k}, svd={settings.svd!r}, {stack.dtype})"


#: Why a decomposition of finite inputs can fail, and what to do about it.
_EXTREME_SCALE_ADVICE = (
    "Its inputs are finite, so the likely cause is task vectors of extreme magnitude "
    "(about 1e-20 and below, or 1e18 and above, in float32): the engines that form Gram "
    "matrices (gram, gram_subspace, chebyshev, auto) square them out of float32's range. "
    "Try compute_dtype=torch.float64 or svd='exact'."
)


@contextmanager
def _reporting_layer_errors(stack: Tensor, k: int, settings: MergeSettings, name: str | None) -> Iterator[None]:
    """Re-raise a CUDA out-of-memory error or a failed factorisation with the
    layer, its sizes and what to try."""
    where = _layer_description(stack, k, settings, name)
    try:
        yield
    except torch.OutOfMemoryError as error:
        if stack.device.type != "cuda":
            raise
        raise torch.OutOfMemoryError(
            f"lowrank_merge: out of GPU memory merging {where}. Free GPU memory, lower the rank, "
            f"or merge on the CPU (device='cpu'). {error}"
        ) from error
    except torch.linalg.LinAlgError as error:
        raise torch.linalg.LinAlgError(
            f"lowrank_merge: the decomposition of {where} failed. {_EXTREME_SCALE_ADVICE} ({error})"
        ) from error


def _check_finite_result(part: Tensor | Factors, stack: Tensor, k: int, settings: MergeSettings, name: str | None) -> None:
    """A decomposition of finite inputs must give finite values: never pass NaN on to the output."""
    tensors = part if isinstance(part, tuple) else (part,)
    if not all(all_finite(tensor) for tensor in tensors):
        raise FloatingPointError(
            f"lowrank_merge: the decomposition of {_layer_description(stack, k, settings, name)} gave non-finite values. "
            + _EXTREME_SCALE_ADVICE
        )


def _per_layer(
    op: Callable[..., tuple[Tensor, _Part]],
    stack: Tensor,
    k: int,
    settings: MergeSettings,
    name: str | None,
) -> tuple[Tensor, _Part | None]:
    """``op(stack, k, engine, niter, omega)`` with the merge's seeded sketch,
    or ``(average, None)`` where the delta is zero by identity."""
    if _delta_is_zero(stack.shape, k):
        return task_average(stack), None
    with _reporting_layer_errors(stack, k, settings, name):
        engine, niter, omega = _sketch_for(stack, k, settings)
        average, part = op(stack, k, engine, niter, omega)
    _check_finite_result(part, stack, k, settings, name)
    return average, part


def _factors_in_place(
    stack: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Factors]:
    """``(average, (U, S, Vh))``: the steps of ``centered_low_rank_sum`` but the
    last, the sum, on a stack the caller owns. It is centered in place (mean,
    then subtract, as the CPU kernel does): one ``[T, m, n]`` allocation fewer,
    which on the CPU also saves its page faults (0.3-4 s for [8, 4096, 14336]
    fp32 against 0.1-0.4 s in place; benchmarks/NOTES.md)."""
    average = task_average(stack)
    return average, _ops.low_rank_factors(stack.sub_(average), k, engine, niter, omega)


def _sum_in_place(
    stack: Tensor, k: int, engine: str, niter: int, omega: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(average, delta)`` of ``centered_low_rank_sum``, on a stack the caller
    owns: centered in place (:func:`_factors_in_place`)."""
    average, factors = _factors_in_place(stack, k, engine, niter, omega)
    return average, sum_of_reconstructions(*factors)


def _layer_parts(
    stack: Tensor, k: int, settings: MergeSettings, name: str | None = None, owned: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``(average, delta)``; ``delta`` is None where it is zero by identity.
    ``owned``: the stack may be overwritten (centered in place); otherwise the
    ``centered_low_rank_sum`` op runs (which leaves it as it is; on CUDA with its
    fused centering kernel)."""
    op = _sum_in_place if owned else _ops.centered_low_rank_sum
    return _per_layer(op, stack, k, settings, name)


def _layer_factors(
    stack: Tensor, k: int, settings: MergeSettings, name: str | None = None
) -> tuple[Tensor, Factors | None]:
    """``(average, (U, S, Vh))``: the rank-k factors that :func:`_layer_parts` sums.

    The same centering, engine and seeded sketch, so that
    ``low_rank_sum(factors, j)`` gives the delta at every rank ``j <= k``
    (for ``j = k`` the delta of ``_layer_parts``). Factors are None where the
    delta is zero by identity. ``stack`` is overwritten (centered in place):
    callers pass stacks they own.
    """
    return _per_layer(_factors_in_place, stack, k, settings, name)


@torch.no_grad()
def low_rank_sum(factors: Factors | None, k: int, start: int = 0) -> Tensor | None:
    """``Σ_t Σ_{start <= i < k} S_t[i] · U_t[:, i] Vh_t[i, :]`` ``[m, n]`` from rank-K factors.

    ``factors``: ``U [T, m, K]``, ``S [T, K]``, ``Vh [T, K, n]`` (descending
    ``S``), as :func:`tensor_factors` returns them; ``0 <= start < k <= K``.
    With ``start = 0`` this is the low-rank sum of a merge at rank k (the
    first k factors are the rank-k truncation); with ``start = j`` it is what
    rank k adds to the sum at rank j. None (a zero delta, by identity) for
    None factors and for ``k >= min(m, n)``, as in a merge at full rank.
    """
    if factors is None:
        return None
    U, S, Vh = factors
    if _delta_is_zero((U.shape[0], U.shape[-2], Vh.shape[-1]), k):
        return None
    if not 0 <= start < k <= S.shape[-1]:
        raise ValueError(f"need 0 <= start < k <= {S.shape[-1]} (the rank of the factors), got start={start}, k={k}")
    return sum_of_reconstructions(U[..., start:k], S[..., start:k], Vh[..., start:k, :])


@torch.no_grad()
def cart_layer(
    stack: Tensor,
    k: int,
    scale: float = DEFAULT_SCALE,
    *,
    svd: str = "auto",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """One CART layer: ``θ_avg + scale · Σ_t SVD_k(θ_t − θ_avg)``.

    ``stack``: ``[T, m, n]``, the layer of the T models (any floating dtype).
    Returns ``[m, n]`` in ``stack``'s dtype; the math runs in ``compute_dtype``.
    """
    check_scale(scale)
    average, delta = cart_layer_parts(
        stack, k, svd=svd, niter=niter, oversample=oversample, seed=seed, compute_dtype=compute_dtype
    )
    return combine_parts(average, delta, scale, stack.dtype, stack.device)


@torch.no_grad()
def low_rank_approx(
    A: Tensor,
    k: int,
    *,
    svd: str = "auto",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k SVD factors of ``A`` ``[..., m, n]`` with the merge's engines.

    Returns ``U [..., m, k]``, ``S [..., k]`` (descending), ``Vh [..., k, n]``
    in ``A``'s dtype (float32 or float64); ``k`` is clipped to ``min(m, n)``.
    All matrices of a batch share one sketch, so ``f(-A) = -f(A)``.
    """
    if not isinstance(A, Tensor) or A.dim() < 2 or A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"A must be a float32 or float64 tensor of shape [..., m, n], got {_describe(A)}")
    _check_rank(k)
    check_tensor_values("A", [A], ["the input"])
    settings = MergeSettings.create(svd=svd, niter=niter, oversample=oversample, seed=seed)
    k = min(k, *A.shape[-2:])
    engine, niter, omega = _sketch_for(A, k, settings)
    return _ops.low_rank_factors(A, k, engine, niter, omega)


# ---------------------------------------------------------------------------
# Per tensor name
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor name: ``low_rank`` (with rank k), ``average`` or ``copy``."""

    name: str
    action: str
    shape: tuple[int, ...]
    rank: int | None = None


def plan_tensor(name: str, meta: TensorMeta, settings: MergeSettings) -> TensorPlan:
    if not meta.dtype.is_floating_point:
        return TensorPlan(name, "copy", meta.shape)
    if settings.is_low_rank(name, meta):
        return TensorPlan(name, "low_rank", meta.shape, settings.rank_of(meta.shape))
    return TensorPlan(name, "average", meta.shape)


def merge_allocations(settings: MergeSettings, state_dicts: Sequence[StateDict]) -> ContextManager[None]:
    """The huge-page scope around a whole in-memory merge (the layers' own
    scopes nest inside it): what one layer frees, the next layer of its shape
    reuses instead of faulting fresh pages in (:func:`_ops.huge_page_allocations`)."""
    first = next(iter(state_dicts[0].values()), None) if state_dicts else None
    device = settings.device or (first.device if first is not None else torch.device("cpu"))
    return _ops.huge_page_allocations(device)


@contextmanager
def _layer_stack(tensors: Sequence[Tensor], settings: MergeSettings) -> Iterator[Tensor]:
    """``[T, ...]`` in the compute dtype on the compute device, in one copy per
    input; the stack and the layer's work in the ``with`` block allocate on
    huge pages (:func:`_ops.huge_page_allocations`)."""
    device = settings.device or tensors[0].device
    with _ops.huge_page_allocations(device):
        stack = torch.empty((len(tensors), *tensors[0].shape), dtype=settings.compute_dtype, device=device)
        for slot, tensor in zip(stack, tensors):
            slot.copy_(tensor)
        yield stack


def _tensor_parts(
    plan: TensorPlan,
    tensors: Sequence[Tensor],
    settings: MergeSettings,
    layer: Callable[..., tuple[Tensor, _Part | None]],
) -> tuple[Tensor, _Part | None]:
    if plan.action == "copy":
        return tensors[0], None
    with _layer_stack(tensors, settings) as stack:
        if plan.action == "average":
            return task_average(stack), None
        return layer(stack, plan.rank, settings, plan.name)  # the stack is this call's copy: layer may overwrite it


@torch.no_grad()
def tensor_parts(
    plan: TensorPlan, tensors: Sequence[Tensor], settings: MergeSettings
) -> tuple[Tensor, Tensor | None]:
    """``(average, delta)`` of one tensor name, in the compute dtype.

    For ``copy`` tensors the "average" is the first model's tensor itself and
    ``delta`` is None; for ``average`` tensors ``delta`` is None.
    """
    return _tensor_parts(plan, tensors, settings, partial(_layer_parts, owned=True))


@torch.no_grad()
def tensor_factors(
    plan: TensorPlan, tensors: Sequence[Tensor], settings: MergeSettings
) -> tuple[Tensor, Factors | None]:
    """``(average, factors)`` of one tensor name: :func:`tensor_parts` with the
    delta left as its rank-``plan.rank`` :data:`Factors` (None where there is
    no delta), to be summed at any smaller rank by :func:`low_rank_sum`."""
    return _tensor_parts(plan, tensors, settings, _layer_factors)


def output_dtype(plan: TensorPlan, first: Tensor, settings: MergeSettings) -> torch.dtype:
    """``settings.out_dtype`` for floating tensors, else the input's own dtype."""
    if plan.action == "copy" or settings.out_dtype is None:
        return first.dtype
    return settings.out_dtype


@torch.no_grad()
def combine_parts(
    average: Tensor, delta: Tensor | None, scale: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A fresh tensor ``average + scale * delta`` in ``dtype`` on ``device``."""
    if delta is None or scale == 0:
        return average.to(device=device, dtype=dtype, copy=True)
    # The same two roundings as ``average + scale * delta``, in one new tensor
    # and two passes (``tune`` runs this once per grid point over the model).
    return (delta * scale).add_(average).to(device=device, dtype=dtype)


@torch.no_grad()
def merge_tensor(name: str, tensors: Sequence[Tensor], settings: MergeSettings, labels: Sequence[str]) -> Tensor:
    """Merge the T values of one tensor name (the unit the streamer runs).

    Checks values first (finite, or equal for non-floating buffers). The result
    is on the first tensor's device, in ``settings.out_dtype`` or the first
    tensor's dtype.
    """
    check_tensor_values(name, tensors, labels)
    return _merge_checked_tensor(name, tensors, settings)


def _merge_checked_tensor(name: str, tensors: Sequence[Tensor], settings: MergeSettings) -> Tensor:
    """:func:`merge_tensor` for values already checked (:func:`cart_merge`
    checks every tensor before the first decomposition)."""
    first = tensors[0]
    plan = plan_tensor(name, TensorMeta.of(first), settings)
    average, delta = tensor_parts(plan, tensors, settings)
    return combine_parts(average, delta, settings.scale, output_dtype(plan, first, settings), first.device)


# ---------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------


def as_state_dict(model: ModelLike, label: str) -> StateDict:
    if isinstance(model, nn.Module):
        return model.state_dict()
    if isinstance(model, Mapping):
        for name, value in model.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{label}: value of {name!r} is a {type(value).__name__}, not a torch.Tensor")
        return model
    raise TypeError(f"{label} is a {type(model).__name__}; expected a state dict (name -> tensor) or an nn.Module")


def prepare_models(
    models: Sequence[ModelLike], base: ModelLike | None
) -> tuple[list[StateDict], list[str]]:
    """State dicts and their labels, checked for compatibility (base included)."""
    if isinstance(models, (Mapping, nn.Module)) or not isinstance(models, Sequence):
        raise TypeError("models must be a sequence (list or tuple) of state dicts or nn.Modules")
    if len(models) == 0:
        raise ValueError("no models to merge: pass at least one state dict")
    labels = [f"model {index}" for index in range(len(models))]
    state_dicts = [as_state_dict(model, label) for model, label in zip(models, labels)]
    checked, checked_labels = list(state_dicts), list(labels)
    if base is not None:
        # The base cancels out of CART (θ_t − θ_0 − mean(θ_t − θ_0) = θ_t − θ_avg);
        # it is only checked, so that a wrong base is reported, not ignored.
        checked.append(as_state_dict(base, "base"))
        checked_labels.append("base")
    check_compatible([{n: TensorMeta.of(t) for n, t in sd.items()} for sd in checked], checked_labels)
    return state_dicts, labels


def _check_all_values(state_dicts: Sequence[StateDict], labels: Sequence[str]) -> None:
    for name in state_dicts[0]:
        check_tensor_values(name, [sd[name] for sd in state_dicts], labels)


def _progress(names: Sequence[_Item], enabled: bool, description: str, unit: str = "tensor") -> Iterable[_Item]:
    if not enabled:
        return names
    from tqdm.auto import tqdm

    return tqdm(names, desc=description, unit=unit)


def cart_merge(
    models: Sequence[ModelLike],
    *,
    rank_ratio: float = DEFAULT_RANK_RATIO,
    rank: int | None = None,
    scale: float = DEFAULT_SCALE,
    base: ModelLike | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    svd: str = "auto",
    niter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Merge T fine-tuned models with CART.

    Args:
        models: T >= 1 state dicts (name -> tensor) or ``nn.Module`` s with the
            same keys and shapes.
        rank_ratio: kept rank per matrix, ``k = max(1, floor(rank_ratio *
            min(m, n)))``; in (0, 1]. Default 0.08, the paper's headline rank.
        rank: a fixed k for every matrix instead (clipped to ``min(m, n)``).
        scale: λ, the factor on the summed low-rank task vectors. Default 2.0.
        base: the pretrained model. Checked for compatibility only: it cancels
            out of CART.
        include / exclude: regular expressions (``re.search`` on the name)
            choosing the low-ranked 2-D tensors. ``exclude=None`` means
            :data:`~lowrank_merge.DEFAULT_EXCLUDE`; see
            :func:`~lowrank_merge.key_preset` for the reference filter.
        svd: ``"auto"``, ``"exact"``, ``"randomized"``, ``"krylov"``, ``"gram"``,
            ``"gram_subspace"`` or ``"chebyshev"`` (see the README's engine table).
        niter / oversample: iterations and extra sketch columns of the sketch
            engines (defaults: 2, and 10 for ``randomized`` / 0 for ``krylov``;
            3 / 4 and ``max(10, k // 2)`` for ``gram_subspace`` / ``chebyshev``).
        seed: seed of the Gaussian sketch; equal seeds give equal results.
        device: where the math runs (default: where the tensors are).
        compute_dtype: float32 (default) or float64.
        out_dtype: dtype of floating outputs (default: each input's dtype).
        progress: show a tqdm progress bar.

    Returns:
        The merged state dict, on the devices of the first model's tensors.
    """
    settings = MergeSettings.create(
        rank_ratio=rank_ratio,
        rank=rank,
        scale=scale,
        include=include,
        exclude=exclude,
        svd=svd,
        niter=niter,
        oversample=oversample,
        seed=seed,
        device=device,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
    )
    state_dicts, labels = prepare_models(models, base)
    _check_all_values(state_dicts, labels)
    with merge_allocations(settings, state_dicts):
        return {
            name: _merge_checked_tensor(name, [sd[name] for sd in state_dicts], settings)
            for name in _progress(list(state_dicts[0]), progress, "CART merge")
        }


@dataclass
class CartDeltas:
    """A decomposed merge: the average and the low-rank sum of every tensor.

    ``merged(scale)`` gives the CART merge for any λ without decomposing again,
    which makes tuning λ on a validation set cheap. Holds about twice the size
    of one model.
    """

    parts: dict[str, tuple[Tensor, Tensor | None]]
    layouts: dict[str, tuple[torch.dtype, torch.device]]  # output dtype and device per name

    def merged(self, scale: float) -> dict[str, Tensor]:
        check_scale(scale)
        return {
            name: combine_parts(average, delta, scale, *self.layouts[name])
            for name, (average, delta) in self.parts.items()
        }


def cart_decompose(
    models: Sequence[ModelLike],
    *,
    base: ModelLike | None = None,
    progress: bool = False,
    **settings: object,
) -> CartDeltas:
    """Decompose once, then merge at any λ with ``.merged(scale)``.

    Keyword arguments as in :func:`cart_merge` (``scale`` is given later);
    ``cart_decompose(models, **kw).merged(λ)`` equals
    ``cart_merge(models, scale=λ, **kw)``.
    """
    if "scale" in settings:
        raise TypeError("cart_decompose takes no scale: give λ to .merged(scale) (or use cart_merge)")
    merge_settings = MergeSettings.create(**settings)
    state_dicts, labels = prepare_models(models, base)
    _check_all_values(state_dicts, labels)
    plans = {name: plan_tensor(name, TensorMeta.of(tensor), merge_settings) for name, tensor in state_dicts[0].items()}
    return CartDeltas(*decompose_models(state_dicts, plans, merge_settings, tensor_parts, progress, "CART decompose"))


def decompose_models(
    state_dicts: Sequence[StateDict],
    plans: Mapping[str, TensorPlan],
    settings: MergeSettings,
    parts_of: Callable[[TensorPlan, Sequence[Tensor], MergeSettings], tuple[Tensor, _Part | None]],
    progress: bool = False,
    description: str = "CART decompose",
) -> tuple[dict[str, tuple[Tensor, _Part | None]], dict[str, tuple[torch.dtype, torch.device]]]:
    """``parts_of(plans[name], tensors, settings)`` for every tensor name of
    checked ``state_dicts`` (``tensor_parts`` or ``tensor_factors``), and the
    output ``(dtype, device)`` of each name."""
    parts, layouts = {}, {}
    with merge_allocations(settings, state_dicts):
        for name in _progress(list(state_dicts[0]), progress, description):
            tensors = [sd[name] for sd in state_dicts]
            parts[name] = parts_of(plans[name], tensors, settings)
            layouts[name] = (output_dtype(plans[name], tensors[0], settings), tensors[0].device)
    return parts, layouts
