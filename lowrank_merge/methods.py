"""The merge methods beside CART, in one registry with one per-tensor interface.

Every method is a function of the T tensors of one name (plus the pretrained
base tensor where the method needs one), so the checkpoint streamer runs any
method tensor by tensor exactly as it runs CART:

    settings = method_settings("ties", density=0.2)        # validated, cheap
    settings = prepare(settings, source, labels)            # whole-model pre-pass, if any
    merged = merge_method_tensor(name, tensors, base, settings, labels)

Methods (``METHODS``), with θ_t the T fine-tuned models, θ_0 the base and
Δ_t = θ_t − θ_0 their task vectors:

* ``cart``: CART (Choi et al. 2024), see :mod:`lowrank_merge.cart`.
* ``average``: θ = mean_t θ_t (weight averaging, Wortsman et al. 2022).
* ``task_arithmetic``: θ = θ_0 + scale · Σ_t Δ_t (Ilharco et al., ICLR 2023).
* ``ties``: trim each Δ_t to its largest ``density`` fraction of magnitudes,
  elect a sign per entry, average the entries that agree with it (Yadav et
  al., NeurIPS 2023); trimming per tensor or over the whole model.
* ``tsv``: TSV-M (Gargiulo et al., CVPR 2025): each Δ_t's top singular
  triplets, the concatenated factors orthogonalised.
* ``iso_c`` / ``iso_cts``: Iso-C / Iso-CTS (Marczak et al., ICML 2025): the
  summed task matrix with an isotropic (flat) spectrum, in the common subspace
  (Iso-C) or in common plus task-specific subspaces (Iso-CTS).

The SVD methods (``cart``, ``tsv``, ``iso_c``, ``iso_cts``) treat the 2-D
tensors chosen by the key filter (``include`` / ``exclude``, as in CART) and
merge every other floating tensor by their non-matrix rule; ``average``,
``task_arithmetic`` and ``ties`` treat every floating tensor alike. Non-floating
tensors are copied when all inputs agree. Only ``ties`` with ``trim="model"``
needs a whole-model pre-pass (a global magnitude threshold per task).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import Tensor

from .cart import (
    DEFAULT_RANK_RATIO,
    DEFAULT_SCALE,
    MergeSettings,
    ModelLike,
    _layer_stack,
    _progress,
    as_state_dict,
    combine_parts,
    low_rank_approx,
    merge_allocations,
    merge_tensor,
    output_dtype,
    plan_tensor,
    prepare_models,
)
from .engines import task_average
from .selection import rank_for
from .validation import TensorMeta, check_tensor_values

#: One tensor name's inputs: its name, the T models' tensors, the base tensor or None.
TensorItem = tuple[str, Sequence[Tensor], Tensor | None]
#: Yields the :data:`TensorItem` of every tensor name, afresh on each call.
TensorSource = Callable[[], Iterable[TensorItem]]
#: ``(name, tensors, base, settings, labels) -> merged tensor``: the unit of work.
MethodTensorFn = Callable[[str, Sequence[Tensor], Tensor | None, "MethodSettings", Sequence[str]], Tensor]
#: ``(name, stack [T, ...], base [...] or None, settings) -> merged [...]``, all in
#: the compute dtype on the compute device; ``stack`` is a private copy.
LayerRule = Callable[[str, Tensor, Tensor | None, "MethodSettings"], Tensor]
#: ``(settings, source, labels) -> settings`` with the whole-model statistics filled in.
Prepass = Callable[["MethodSettings", TensorSource, Sequence[str]], "MethodSettings"]

#: Parameters of the methods that decompose (key filter and SVD engine), as in CART.
ENGINE_PARAMETERS = ("include", "exclude", "svd", "niter", "oversample", "seed")
#: Parameters of every method: where and in which precision the math runs.
COMPUTE_PARAMETERS = ("device", "compute_dtype", "out_dtype")

#: λ of task arithmetic: Ilharco et al. choose it on held-out data from
#: {0, 0.05, ..., 1}; 0.3 is FusionBench's default (task_arithmetic.yaml),
#: the usual choice for 8 ViT tasks.
TASK_ARITHMETIC_SCALE = 0.3
#: TIES without a validation set: keep the top 20 % of each task vector
#: (the paper's k = 20, FusionBench's threshold: 20) and λ = 1 (Yadav et al. 2023).
TIES_DENSITY = 0.2
TIES_SCALE = 1.0
#: TSV-M's α = 1.0 (Gargiulo et al. 2025; FusionBench's TaskSingularVectorMerging.yaml: alpha 1).
TSV_SCALE = 1.0
#: Iso-C / Iso-CTS α for ViT-B/32 with 8 tasks as reported by Marczak et al.
#: 2025 (1.30 / 1.50; FusionBench's configs default to 1.0: tune it on held-out
#: data), and the share of the rank kept for the common subspace (the
#: authors' iso_cts.yaml: common_space_fraction 0.8).
ISO_C_SCALE = 1.30
ISO_CTS_SCALE = 1.50
ISO_CTS_COMMON_FRACTION = 0.8
TRIM_CHOICES = ("model", "tensor")


@dataclass(frozen=True)
class MethodSpec:
    """A merge method of the registry.

    ``parameters`` maps the method's own hyper-parameters to their defaults;
    ``uses_svd`` methods also take :data:`ENGINE_PARAMETERS`, and every method
    takes :data:`COMPUTE_PARAMETERS`. ``base`` is ``"required"`` (the method
    works on task vectors θ_t − θ_0) or ``"optional"`` (a given base is only
    checked for compatibility). ``prepass``, where set, computes whole-model
    statistics before the first tensor is merged (see :func:`prepare`).
    """

    name: str
    base: str
    parameters: Mapping[str, object]
    uses_svd: bool
    merge_tensor: MethodTensorFn
    reference: str
    prepass: Prepass | None = None

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    @property
    def reference_url(self) -> str:
        """The paper's arXiv page (``reference`` ends with its arXiv id)."""
        return "https://arxiv.org/abs/" + self.reference.rsplit("arXiv ", 1)[1]

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every parameter name the method takes."""
        engine = ENGINE_PARAMETERS if self.uses_svd else ()
        return (*self.parameters, *engine, *COMPUTE_PARAMETERS)


@dataclass(frozen=True)
class MethodSettings:
    """Validated parameters of one method (build with :func:`method_settings`).

    ``compute`` carries the key filter, engine, device and dtypes (and, for
    ``cart``, its rank and scale). Fields a method does not take keep their
    defaults and are not read. ``thresholds`` holds TIES's whole-model
    magnitude threshold per task once :func:`prepare` has run.
    """

    spec: MethodSpec
    compute: MergeSettings
    scale: float = 1.0
    rank_ratio: float | None = None
    rank: int | None = None
    density: float = 1.0
    common_fraction: float = 1.0
    trim: str = "tensor"
    thresholds: tuple[float, ...] | None = None


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_settings(method: str, **parameters: object) -> MethodSettings:
    """Validate ``parameters`` of ``method`` (defaults filled in) before any work.

    Raises ``ValueError``/``TypeError`` naming the method and parameter.
    """
    spec = get_method(method)
    unknown = [key for key in parameters if key not in spec.accepted]
    if unknown:
        raise TypeError(
            f"merge method {method!r} takes no parameter {unknown[0]!r}; its parameters: {', '.join(spec.accepted)}"
        )
    values = {**spec.parameters, **parameters}
    _check_fraction("density", values.get("density", 1.0), low_open=True)
    _check_fraction("common_fraction", values.get("common_fraction", 1.0), low_open=False)
    if values.get("trim", "tensor") not in TRIM_CHOICES:
        raise ValueError(f"trim must be one of {TRIM_CHOICES}, got {values['trim']!r}")
    rank_ratio = values.pop("rank_ratio", None)
    scale = values.pop("scale", 1.0)
    own = {key: values.pop(key) for key in ("rank", "density", "common_fraction", "trim") if key in values}
    compute = MergeSettings.create(
        rank_ratio=DEFAULT_RANK_RATIO if rank_ratio is None else rank_ratio,
        scale=scale,
        rank=own.get("rank"),
        **values,
    )
    return MethodSettings(spec, compute, scale=float(scale), rank_ratio=rank_ratio, **own)


def _check_fraction(argument: str, value: object, *, low_open: bool) -> None:
    interval = "(0, 1]" if low_open else "[0, 1]"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a number in {interval}, got {value!r}")
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"{argument} must be in {interval}, got {value!r}")


def check_base(spec: MethodSpec, base: object | None) -> None:
    """Raise before any work when ``spec`` needs a base and none is given."""
    if spec.needs_base and base is None:
        raise ValueError(
            f"merge method {spec.name!r} needs base= (the pretrained model): it merges task vectors θ_t − θ_base"
        )


# ---------------------------------------------------------------------------
# Per tensor
# ---------------------------------------------------------------------------


def merge_method_tensor(
    name: str, tensors: Sequence[Tensor], base: Tensor | None, settings: MethodSettings, labels: Sequence[str]
) -> Tensor:
    """Merge the T tensors of one name with ``settings``' method.

    ``tensors``: the T models' tensors of one name (same shape); ``base``: the
    base model's tensor, or None where the method does not need it.
    ``labels``: the T models' names for error messages, optionally followed by
    the base's (else it is called "base"). Returns a fresh tensor on the first
    tensor's device, in ``out_dtype`` or the first tensor's dtype.
    """
    check_base(settings.spec, base)
    return settings.spec.merge_tensor(name, tensors, base, settings, labels)


@torch.no_grad()
def _merge_by_rule(
    rule: LayerRule,
    name: str,
    tensors: Sequence[Tensor],
    base: Tensor | None,
    settings: MethodSettings,
    labels: Sequence[str],
) -> Tensor:
    inputs, input_labels = _with_base(tensors, base, labels)
    check_tensor_values(name, inputs, input_labels)
    first = tensors[0]
    plan = plan_tensor(name, TensorMeta.of(first), settings.compute)
    if plan.action == "copy":
        merged = first
    else:
        with _layer_stack(tensors, settings.compute) as stack:
            merged = rule(name, stack, None if base is None else base.to(stack), settings)
    return combine_parts(merged, None, 0.0, output_dtype(plan, first, settings.compute), first.device)


def _with_base(tensors: Sequence[Tensor], base: Tensor | None, labels: Sequence[str]) -> tuple[list[Tensor], list[str]]:
    """The tensors and labels to check: the T models', and the base's where it is read
    (``labels`` may end with the base's label; else it is called "base")."""
    models = list(labels[: len(tensors)])
    if base is None:
        return list(tensors), models
    return [*tensors, base], [*models, labels[len(tensors)] if len(labels) > len(tensors) else "base"]


def _cart_tensor(
    name: str, tensors: Sequence[Tensor], base: Tensor | None, settings: MethodSettings, labels: Sequence[str]
) -> Tensor:
    """CART itself (the base cancels out of it and is not read)."""
    return merge_tensor(name, tensors, settings.compute, labels)


def _is_matrix(name: str, stack: Tensor, settings: MethodSettings) -> bool:
    """Whether the key filter selects this tensor for an SVD method (2-D, name matched)."""
    return settings.compute.is_low_rank(name, TensorMeta(tuple(stack.shape[1:]), stack.dtype))


# ---------------------------------------------------------------------------
# Rules without decompositions
# ---------------------------------------------------------------------------


def _average(name: str, stack: Tensor, base: Tensor | None, settings: MethodSettings) -> Tensor:
    return task_average(stack)


def _task_arithmetic(name: str, stack: Tensor, base: Tensor, settings: MethodSettings) -> Tensor:
    return base + settings.scale * stack.sub_(base).sum(dim=0)


def _ties(name: str, stack: Tensor, base: Tensor, settings: MethodSettings) -> Tensor:
    """θ_0 + scale · disjoint_mean(trim(Δ_t)) (Yadav et al. 2023, Alg. 1)."""
    deltas = stack.sub_(base)
    if settings.density < 1 and deltas[0].numel() > 0:
        deltas.mul_(_kept(deltas, settings))
    return base + settings.scale * _disjoint_mean(deltas)


def _kept(deltas: Tensor, settings: MethodSettings) -> Tensor:
    """Mask ``[T, ...]`` of the entries with |Δ_t| >= task t's threshold.

    ``trim="tensor"``: the threshold is the k-th largest |Δ_t| of this tensor,
    ``k = max(1, int(density · numel))`` (as mergekit); ``trim="model"``: the
    whole-model threshold from :func:`prepare`.
    """
    tasks = deltas.shape[0]
    magnitudes = deltas.abs()
    if settings.trim == "tensor":
        flat = magnitudes.reshape(tasks, -1)
        k = max(1, int(settings.density * flat.shape[1]))
        thresholds = flat.topk(k, dim=1).values[:, -1]
    elif settings.thresholds is None:
        raise RuntimeError(
            "ties with trim='model' needs its whole-model magnitude thresholds: "
            "run prepare(settings, source, labels) first"
        )
    else:
        thresholds = torch.tensor(settings.thresholds, dtype=deltas.dtype, device=deltas.device)
    return magnitudes >= thresholds.view(tasks, *(1,) * (deltas.dim() - 1))


def _disjoint_mean(deltas: Tensor) -> Tensor:
    """Elect γ = sign(Σ_t Δ_t) (0 counts as +), average the Δ_t whose sign is γ.

    Zero entries (trimmed) have no sign and are not counted; an entry no task
    agrees with stays 0.
    """
    elected = torch.where(deltas.sum(dim=0) >= 0, 1, -1)
    agree = deltas.sign() == elected
    return (deltas * agree).sum(dim=0) / agree.sum(dim=0).clamp_(min=1)


# ---------------------------------------------------------------------------
# TIES whole-model trimming: exact per-task thresholds in streaming passes
# ---------------------------------------------------------------------------

#: Bits of the magnitudes' bit patterns resolved per pass (2**16 counts per task).
_DIGIT_BITS = 16
_INT_VIEWS = {torch.float32: torch.int32, torch.float64: torch.int64}


class _MagnitudeThresholds:
    """The exact k-th largest |Δ_t| over a whole model, for each task t.

    Radix select on the bit patterns of the magnitudes (non-negative IEEE
    floats sort like their bits read as integers), 16 bits per pass over the
    model: 2 passes in float32, 4 in float64, with T × 65,536 counts of memory
    however large the model. ``k = max(1, int(density · N))``, N the number of
    floating entries of the model.
    """

    def __init__(self, dtype: torch.dtype, density: float) -> None:
        self.dtype = dtype
        self.int_dtype = _INT_VIEWS[dtype]
        self.value_bits = torch.finfo(dtype).bits - 1  # the sign bit of |x| is 0
        self.density = density
        self.resolved = 0  # leading bits of the thresholds known so far
        self.entries = 0
        self.prefix: Tensor | None = None  # [T] the resolved leading bits
        self.rank: Tensor | None = None  # [T] rank of the threshold among entries sharing the prefix
        self.counts: Tensor | None = None  # [T * 2**width] digit counts of this pass

    @property
    def passes(self) -> int:
        return math.ceil(self.value_bits / _DIGIT_BITS)

    def _digit(self) -> tuple[int, int]:
        width = min(_DIGIT_BITS, self.value_bits - self.resolved)
        return self.value_bits - self.resolved - width, width

    def add(self, magnitudes: Tensor) -> None:
        """Count one tensor's magnitudes ``[T, n]`` (compute dtype)."""
        tasks = magnitudes.shape[0]
        shift, width = self._digit()
        if self.prefix is None:
            self.prefix = torch.zeros(tasks, dtype=torch.int64, device=magnitudes.device)
        if self.counts is None:
            self.counts = torch.zeros(tasks << width, dtype=torch.int64, device=magnitudes.device)
        if self.rank is None:
            self.entries += magnitudes.shape[1]
        bits = magnitudes.view(self.int_dtype).to(torch.int64)
        matched = (bits >> (shift + width)) == self.prefix[:, None]
        rows = torch.arange(tasks, device=bits.device)[:, None] << width
        digits = ((bits >> shift) & ((1 << width) - 1)) + rows
        self.counts += torch.bincount(digits[matched], minlength=tasks << width)

    def end_pass(self) -> None:
        """Fix the next digit of every task's threshold."""
        if self.counts is None:  # no floating tensor at all
            return
        _, width = self._digit()
        tasks = self.prefix.shape[0]
        if self.rank is None:
            self.rank = torch.full_like(self.prefix, max(1, int(self.density * self.entries)))
        at_least = self.counts.view(tasks, 1 << width).flip(1).cumsum(dim=1)  # [:, j]: digits >= 2**w - 1 - j
        below_rank = (at_least < self.rank[:, None]).sum(dim=1)
        above = torch.where(below_rank > 0, at_least.gather(1, (below_rank - 1).clamp(min=0)[:, None])[:, 0], 0)
        self.rank -= above
        self.prefix = (self.prefix << width) | ((1 << width) - 1 - below_rank)
        self.resolved += width
        self.counts = None

    def thresholds(self) -> tuple[float, ...]:
        if self.prefix is None:
            return ()
        return tuple(self.prefix.to(self.int_dtype).view(self.dtype).tolist())


def _ties_trims_over_the_model(settings: MethodSettings) -> bool:
    return settings.trim == "model" and settings.density != 1


@torch.no_grad()
def _ties_prepass(settings: MethodSettings, source: TensorSource, labels: Sequence[str]) -> MethodSettings:
    """Whole-model thresholds for ``trim="model"`` (reads the model 2 or 4 times)."""
    if not _ties_trims_over_the_model(settings):
        return settings
    search = _MagnitudeThresholds(settings.compute.compute_dtype, settings.density)
    for _ in range(search.passes):
        for name, tensors, base in source():
            if not tensors[0].dtype.is_floating_point:
                continue
            check_tensor_values(name, *_with_base(tensors, base, labels))
            with _layer_stack(tensors, settings.compute) as stack:
                search.add(stack.sub_(base.to(stack)).abs_().reshape(len(tensors), -1))
        search.end_pass()
    return replace(settings, thresholds=search.thresholds())


def needs_prepass(settings: MethodSettings) -> bool:
    """Whether :func:`prepare` reads the models before the merge: TIES with
    ``trim="model"`` (and a density below 1)."""
    return settings.spec.prepass is _ties_prepass and _ties_trims_over_the_model(settings)


def prepare(settings: MethodSettings, source: TensorSource, labels: Sequence[str]) -> MethodSettings:
    """Run the method's whole-model pre-pass, if it has one.

    ``source()`` yields ``(name, tensors, base)`` for every tensor name and is
    called once per pass (only ``ties`` with ``trim="model"`` calls it: twice
    in float32, four times in float64). Returns the settings to merge with.
    """
    if settings.spec.prepass is None:
        return settings
    return settings.spec.prepass(settings, source, labels)


# ---------------------------------------------------------------------------
# Rules with decompositions
# ---------------------------------------------------------------------------


def _factors(A: Tensor, k: int, settings: MethodSettings) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k factors of ``A`` ``[..., m, n]`` with the merge's engines.

    A truncated SVD runs on ``settings``' engine; a full-rank one on the exact
    engine, since a sketch as wide as the matrix saves nothing.
    """
    compute = settings.compute
    engine = "exact" if k >= min(A.shape[-2:]) else compute.svd
    return low_rank_approx(A, k, svd=engine, niter=compute.niter, oversample=compute.oversample, seed=compute.seed)


def _polar(A: Tensor, settings: MethodSettings) -> Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``A = P Σ Qᵀ`` (same shape as ``A``)."""
    U, _, Vh = _factors(A, min(A.shape), settings)
    return U @ Vh


def _concatenated(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``[T, m, k], [T, k], [T, k, n]`` -> ``[m, T·k], [T·k], [T·k, n]``, task-major."""
    tasks, m, k = U.shape
    return U.transpose(0, 1).reshape(m, tasks * k), S.reshape(tasks * k), Vh.reshape(tasks * k, Vh.shape[-1])


def _non_matrix(stack: Tensor, base: Tensor, settings: MethodSettings) -> Tensor:
    """What TSV-M and Iso merge tensors they do not decompose to: θ_0 + scale · mean_t Δ_t."""
    return base + settings.scale * task_average(stack.sub_(base))


def _tsv(name: str, stack: Tensor, base: Tensor, settings: MethodSettings) -> Tensor:
    """TSV-M: θ_0 + scale · U⊥ diag(S) V⊥ᵀ from the T tasks' top-k triplets.

    U = [U_1,k … U_T,k], S, V likewise; U⊥, V⊥ are the orthogonal polar factors
    of U and V (Gargiulo et al. 2025, TSV-M).
    """
    tasks, *shape = stack.shape
    k = _tsv_rank(shape, tasks, settings) if _is_matrix(name, stack, settings) else 0
    if k == 0:
        return _non_matrix(stack, base, settings)
    U, S, Vh = _concatenated(*_factors(stack.sub_(base), k, settings))
    delta = (_polar(U, settings) * S) @ _polar(Vh, settings)
    return base + settings.scale * delta


def _tsv_rank(shape: Sequence[int], tasks: int, settings: MethodSettings) -> int:
    """Per-task rank: ``floor(min(m, n) / T)`` by default (TSV-M), else
    :func:`~lowrank_merge.rank_for`'s rank, never above ``floor(min(m, n) / T)``
    so that the T blocks fit in the matrix's rank. 0 when T > min(m, n)."""
    fit = min(shape) // tasks
    if settings.rank is None and settings.rank_ratio is None:
        return fit
    return min(fit, rank_for(shape, settings.rank_ratio, settings.rank))


def iso_cts_split(r: int, tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(k_common, k_task)``: Iso-CTS's common rank and per-task rank for rank ``r``.

    As the reference code: ``k_common = int(r · common_fraction)``, then the
    task-specific total ``r − k_common`` is rounded (Python's round, half to
    even) to a multiple of T, and ``k_common`` takes the rest, so that
    ``k_common + T · k_task = r``. ``k_task`` is capped at ``floor(r / T)``,
    where the reference code's rounding would leave a negative ``k_common``.
    """
    per_task = min(round((r - int(r * common_fraction)) / tasks), r // tasks)
    return r - tasks * per_task, per_task


def _iso(name: str, stack: Tensor, base: Tensor, settings: MethodSettings, common_fraction: float) -> Tensor:
    """Iso-CTS (Iso-C when every direction is common): θ_0 + scale · σ̄ U⊥ V⊥ᵀ.

    The common subspace is the top ``k_c`` singular triplets of Σ_t Δ_t; each
    task adds the top ``k_t`` triplets of Δ_t with the common left subspace
    projected out; U⊥, V⊥ are the polar factors of the concatenations and σ̄
    the mean of the r kept singular values (Marczak et al. 2025).
    """
    tasks, *shape = stack.shape
    if not _is_matrix(name, stack, settings) or min(shape) == 0:
        return _non_matrix(stack, base, settings)
    deltas = stack.sub_(base)
    k_common, k_task = iso_cts_split(min(shape), tasks, common_fraction)
    parts = []
    if k_common:
        parts.append(_concatenated(*_factors(deltas.sum(dim=0, keepdim=True), k_common, settings)))
    if k_task:
        if parts:
            U_common = parts[0][0]
            deltas -= U_common @ (U_common.mT @ deltas)
        parts.append(_concatenated(*_factors(deltas, k_task, settings)))
    U, S, Vh = (torch.cat(blocks, dim=axis) for blocks, axis in zip(zip(*parts), (1, 0, 0)))
    if k_task:
        U, Vh = _polar(U, settings), _polar(Vh, settings)
    return base + (settings.scale * S.mean()) * (U @ Vh)


def _iso_c(name: str, stack: Tensor, base: Tensor, settings: MethodSettings) -> Tensor:
    return _iso(name, stack, base, settings, common_fraction=1.0)


def _iso_cts(name: str, stack: Tensor, base: Tensor, settings: MethodSettings) -> Tensor:
    return _iso(name, stack, base, settings, common_fraction=settings.common_fraction)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def _spec(
    name: str, rule: LayerRule, base: str, parameters: Mapping[str, object], reference: str, **options: object
) -> MethodSpec:
    """A method whose per-tensor work is ``rule`` on the stacked inputs."""
    return MethodSpec(
        name, base, parameters, merge_tensor=partial(_merge_by_rule, rule), reference=reference, **options
    )


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "cart",
            "optional",
            {"rank_ratio": DEFAULT_RANK_RATIO, "rank": None, "scale": DEFAULT_SCALE},
            uses_svd=True,
            merge_tensor=_cart_tensor,
            reference="Choi et al. 2024, arXiv 2412.12153",
        ),
        _spec("average", _average, "optional", {}, "Wortsman et al. 2022, arXiv 2203.05482", uses_svd=False),
        _spec(
            "task_arithmetic",
            _task_arithmetic,
            "required",
            {"scale": TASK_ARITHMETIC_SCALE},
            "Ilharco et al. 2023, arXiv 2212.04089",
            uses_svd=False,
        ),
        _spec(
            "ties",
            _ties,
            "required",
            {"density": TIES_DENSITY, "scale": TIES_SCALE, "trim": "model"},
            "Yadav et al. 2023, arXiv 2306.01708",
            uses_svd=False,
            prepass=_ties_prepass,
        ),
        _spec(
            "tsv",
            _tsv,
            "required",
            {"rank_ratio": None, "rank": None, "scale": TSV_SCALE},
            "Gargiulo et al. 2025, arXiv 2412.00081",
            uses_svd=True,
        ),
        _spec(
            "iso_c", _iso_c, "required", {"scale": ISO_C_SCALE}, "Marczak et al. 2025, arXiv 2502.04959", uses_svd=True
        ),
        _spec(
            "iso_cts",
            _iso_cts,
            "required",
            {"scale": ISO_CTS_SCALE, "common_fraction": ISO_CTS_COMMON_FRACTION},
            "Marczak et al. 2025, arXiv 2502.04959",
            uses_svd=True,
        ),
    )
}


# ---------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------


def merge(
    models: Sequence[ModelLike],
    method: str = "cart",
    *,
    base: ModelLike | None = None,
    progress: bool = False,
    **parameters: object,
) -> dict[str, Tensor]:
    """Merge T models with any method of :data:`METHODS`.

    Args:
        models: T >= 1 state dicts or ``nn.Module`` s with the same keys and shapes.
        method: ``"cart"`` (default), ``"average"``, ``"task_arithmetic"``,
            ``"ties"``, ``"tsv"``, ``"iso_c"`` or ``"iso_cts"``.
        base: the pretrained model; required by every method but ``cart``
            (checked only) and ``average`` (checked only).
        progress: a tqdm progress bar over tensors.
        **parameters: the method's parameters (``METHODS[method].accepted``):
            ``scale``, ``rank_ratio`` / ``rank``, ``density``, ``trim``,
            ``common_fraction``, the engine options of :func:`cart_merge`
            (``include``, ``exclude``, ``svd``, ``niter``, ``oversample``,
            ``seed``) for the SVD methods, and ``device``, ``compute_dtype``,
            ``out_dtype`` for all.

    Returns:
        The merged state dict, on the devices of the first model's tensors.
        ``merge(models, "cart", **kw)`` equals ``cart_merge(models, **kw)``.
    """
    settings = method_settings(method, **parameters)
    check_base(settings.spec, base)
    state_dicts, labels = prepare_models(models, base)
    base_dict = None if base is None else as_state_dict(base, "base")
    names = list(state_dicts[0])

    def source() -> Iterable[TensorItem]:
        return ((name, [sd[name] for sd in state_dicts], _base_tensor(base_dict, name, settings)) for name in names)

    for name, tensors, base_tensor in source():
        check_tensor_values(name, *_with_base(tensors, base_tensor, labels))
    with merge_allocations(settings.compute, state_dicts):
        settings = prepare(settings, source, labels)
        return {
            name: merge_method_tensor(name, tensors, base_tensor, settings, labels)
            for name, tensors, base_tensor in _progress(list(source()), progress, f"{method} merge")
        }


def _base_tensor(base_dict: Mapping[str, Tensor] | None, name: str, settings: MethodSettings) -> Tensor | None:
    """The base's tensor where the method reads it (a checked-only base is not passed on)."""
    return base_dict[name] if base_dict is not None and settings.spec.needs_base else None
