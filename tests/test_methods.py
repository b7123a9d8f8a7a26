"""The baselines beside CART (lowrank_merge.methods) against float64 references.

The references below are written from the papers' definitions, not from the
library: dense ``torch.linalg.svd`` per task and matrix, in float64, with the
key selection of ``conftest.default_selects``.

* TIES (Yadav et al. 2023): trim Δ_t to its top-``density`` magnitudes (per
  tensor or over the whole model), elect sign(Σ_t Δ̂_t), disjoint mean.
* TSV-M (Gargiulo et al. 2025): per task the top k = floor(min(m, n)/T)
  singular triplets; U = [U_1 … U_T], V likewise, replaced by their polar
  factors (from an SVD: P Qᵀ); Δ = U⊥ diag(S) V⊥ᵀ; θ = θ_0 + α Δ.
* Iso-C (Marczak et al. 2025): Δ = σ̄ U Vᵀ from the SVD U Σ Vᵀ of Σ_t Δ_t, σ̄
  the mean singular value. Iso-CTS: the top k_c triplets of Σ_t Δ_t plus each
  task's top triplets of (I − U_c U_cᵀ) Δ_t, polar factors of the
  concatenations, σ̄ the mean of the r kept singular values.
* Tensors the SVD methods do not decompose: θ_0 + α · mean_t Δ_t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch
from torch import Tensor

import lowrank_merge as lm
from conftest import as_module, default_selects, make_models, relative_error
from lowrank_merge import methods

StateDict = dict[str, Tensor]


def tasks_and_base(T: int = 3, d: int = 16, seed: int = 0) -> tuple[list[StateDict], StateDict]:
    """T fine-tuned models and their base (model 0 of T + 1 siblings)."""
    models = make_models(T + 1, d, seed=seed)
    return models[1:], models[0]


# ---------------------------------------------------------------------------
# float64 references, from the papers
# ---------------------------------------------------------------------------


def f64(tensor: Tensor) -> Tensor:
    return tensor.to(torch.float64)


def polar(A: Tensor) -> Tensor:
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def reference_tsv_delta(deltas: Sequence[Tensor], k: int) -> Tensor:
    Us, Ss, Vs = [], [], []
    for delta in deltas:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        Us.append(U[:, :k])
        Ss.append(S[:k])
        Vs.append(Vh[:k].T)
    U, S, V = torch.cat(Us, dim=1), torch.cat(Ss), torch.cat(Vs, dim=1)
    return polar(U) @ torch.diag(S) @ polar(V).T


def reference_iso_split(r: int, T: int, fraction: float) -> tuple[int, int]:
    """As the Iso-CTS reference code: the task-specific share rounded to a multiple
    of T; where that rounding asks for more than r directions (the reference code
    would get a negative common rank), T·floor(r/T)."""
    common = int(r * fraction)
    task_total = min(round((r - common) / T), r // T) * T
    return r - task_total, task_total // T


def reference_iso_delta(deltas: Sequence[Tensor], fraction: float) -> Tensor:
    total = sum(deltas)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    common, per_task = reference_iso_split(min(total.shape), len(deltas), fraction)
    if per_task == 0:  # Iso-C
        return S.mean() * U @ Vh
    Uc = U[:, :common]
    Us, Ss, Vs = [], [], []
    for delta in deltas:  # task-specific blocks first, then the common one, as the reference code
        Ut, St, Vht = torch.linalg.svd(delta - Uc @ Uc.T @ delta, full_matrices=False)
        Us.append(Ut[:, :per_task])
        Ss.append(St[:per_task])
        Vs.append(Vht[:per_task].T)
    U_all = torch.cat([*Us, Uc], dim=1)
    S_all = torch.cat([*Ss, S[:common]])
    V_all = torch.cat([*Vs, Vh[:common].T], dim=1)
    return S_all.mean() * polar(U_all) @ polar(V_all).T


def reference_svd_method(
    models: Sequence[Mapping[str, Tensor]],
    base: Mapping[str, Tensor],
    matrix_delta: Callable[[list[Tensor]], Tensor | None],
    scale: float,
) -> StateDict:
    """θ_0 + α · matrix_delta(Δ) for selected matrices, θ_0 + α · mean Δ for other floats."""
    out: StateDict = {}
    for name, first in models[0].items():
        if not first.dtype.is_floating_point:
            out[name] = first
            continue
        deltas = [f64(model[name]) - f64(base[name]) for model in models]
        delta = matrix_delta(deltas) if default_selects(name, first) else None
        out[name] = f64(base[name]) + scale * (sum(deltas) / len(deltas) if delta is None else delta)
    return out


def reference_tsv(models, base, scale: float = 1.0) -> StateDict:
    def matrix_delta(deltas: list[Tensor]) -> Tensor | None:
        k = min(deltas[0].shape) // len(deltas)
        return reference_tsv_delta(deltas, k) if k else None

    return reference_svd_method(models, base, matrix_delta, scale)


def reference_iso(models, base, scale: float, fraction: float) -> StateDict:
    return reference_svd_method(models, base, lambda deltas: reference_iso_delta(deltas, fraction), scale)


def reference_ties(models, base, density: float, scale: float, trim: str) -> StateDict:
    floats = [name for name, t in base.items() if t.dtype.is_floating_point]
    deltas = {name: torch.stack([f64(m[name]) - f64(base[name]) for m in models]) for name in floats}
    T = len(models)
    if trim == "model":
        flat = torch.cat([deltas[name].abs().reshape(T, -1) for name in floats], dim=1)
        k = max(1, int(density * flat.shape[1]))
        global_threshold = flat.kthvalue(flat.shape[1] - k + 1, dim=1).values
    out: StateDict = {}
    for name, first in models[0].items():
        if name not in deltas:
            out[name] = first
            continue
        D = deltas[name].reshape(T, -1)
        if trim == "model":
            threshold = global_threshold
        else:
            k = max(1, int(density * D.shape[1]))
            threshold = D.abs().kthvalue(D.shape[1] - k + 1, dim=1).values
        trimmed = torch.where(D.abs() >= threshold[:, None], D, torch.zeros_like(D))
        elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
        merged = torch.zeros(D.shape[1], dtype=torch.float64)
        for j in range(D.shape[1]):
            agreeing = [float(trimmed[t, j]) for t in range(T) if torch.sign(trimmed[t, j]) == elected[j]]
            merged[j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
        out[name] = f64(base[name]) + scale * merged.reshape(first.shape)
    return out


def assert_close_to(merged: Mapping[str, Tensor], expected: Mapping[str, Tensor], tolerance: float) -> None:
    assert list(merged) == list(expected)
    for name, value in expected.items():
        if value.dtype.is_floating_point:
            assert relative_error(merged[name], value) <= tolerance, name
        else:
            assert torch.equal(merged[name], value), name


EXACT = {"svd": "exact", "compute_dtype": torch.float64, "out_dtype": torch.float64}
FLOAT64 = {"compute_dtype": torch.float64, "out_dtype": torch.float64}


# ---------------------------------------------------------------------------
# Against the references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3])
def test_tsv_matches_reference(T):
    models, base = tasks_and_base(T)
    merged = lm.merge(models, "tsv", base=base, scale=0.7, **EXACT)
    assert_close_to(merged, reference_tsv(models, base, scale=0.7), 1e-10)


@pytest.mark.parametrize("T", [2, 3])
def test_iso_c_matches_reference(T):
    models, base = tasks_and_base(T)
    merged = lm.merge(models, "iso_c", base=base, **EXACT)
    assert_close_to(merged, reference_iso(models, base, scale=1.3, fraction=1.0), 1e-10)


@pytest.mark.parametrize(("T", "fraction"), [(2, 0.8), (3, 0.8), (3, 0.5), (2, 0.0)])
def test_iso_cts_matches_reference(T, fraction):
    models, base = tasks_and_base(T)
    merged = lm.merge(models, "iso_cts", base=base, common_fraction=fraction, scale=1.5, **EXACT)
    assert_close_to(merged, reference_iso(models, base, scale=1.5, fraction=fraction), 1e-10)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_svd_methods_in_float32_with_the_default_engine(method):
    """The default (randomized) engine in float32 stays close on these small, gapped spectra."""
    models, base = tasks_and_base(3)
    reference = {
        "tsv": lambda: reference_tsv(models, base),
        "iso_c": lambda: reference_iso(models, base, 1.3, 1.0),
        "iso_cts": lambda: reference_iso(models, base, 1.5, 0.8),
    }[method]()
    merged = lm.merge(models, method, base=base)
    assert all(merged[name].dtype == models[0][name].dtype for name in merged)
    assert_close_to(merged, reference, 1e-3)


@pytest.mark.parametrize("trim", ["tensor", "model"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_ties_matches_reference(trim, compute_dtype):
    models, base = tasks_and_base(3, d=8)
    dtypes = {"compute_dtype": compute_dtype, "out_dtype": compute_dtype}
    merged = lm.merge(models, "ties", base=base, density=0.3, scale=0.9, trim=trim, **dtypes)
    tolerance = 1e-12 if compute_dtype == torch.float64 else 1e-5
    assert_close_to(merged, reference_ties(models, base, 0.3, 0.9, trim), tolerance)


def test_task_arithmetic_matches_definition():
    models, base = tasks_and_base(3)
    merged = lm.merge(models, "task_arithmetic", base=base, scale=0.4, **FLOAT64)
    for name, value in base.items():
        if value.dtype.is_floating_point:
            expected = f64(value) + 0.4 * sum(f64(m[name]) - f64(value) for m in models)
            assert relative_error(merged[name], expected) <= 1e-12, name


def test_iso_cts_split_follows_the_reference_rounding():
    for r in range(1, 40):
        for T in range(1, 9):
            for fraction in (0.0, 0.3, 0.8, 1.0):
                common, per_task = methods.iso_cts_split(r, T, fraction)
                assert common + T * per_task == r and common >= 0 and per_task >= 0
                assert (common, per_task) == reference_iso_split(r, T, fraction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [1e-6, 0.2, 0.5, 0.999])
def test_whole_model_thresholds_are_exact(dtype, density):
    """The streaming radix select gives torch.kthvalue's k-th largest |Δ_t|, ties and zeros included."""
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (13,), (), (3, 4, 2)]
    base = {f"t{i}": torch.zeros(shape, dtype=dtype) for i, shape in enumerate(shapes)}
    models = [{name: torch.randn(t.shape, generator=g, dtype=dtype) for name, t in base.items()} for _ in range(3)]
    models[0]["t0"][:2] = 0.0  # zeros
    models[1]["t1"][:] = 0.5  # repeated values
    models[2]["t2"] = torch.tensor(-0.5, dtype=dtype)
    settings = lm.method_settings("ties", density=density, compute_dtype=dtype)
    got = lm.prepare(settings, tensor_source(models, base), ["a", "b", "c"]).thresholds
    flat = torch.stack([torch.cat([m[name].abs().reshape(-1) for name in base]) for m in models])
    k = max(1, int(density * flat.shape[1]))
    assert got == tuple(flat.kthvalue(flat.shape[1] - k + 1, dim=1).values.tolist())
    keep_all = lm.method_settings("ties", density=1.0, compute_dtype=dtype)
    assert lm.prepare(keep_all, tensor_source(models, base), ["a", "b", "c"]) is keep_all  # nothing to trim: no pass


# ---------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------


def test_average_of_identical_models_is_the_model():
    model = make_models(1)[0]
    merged = lm.merge([model, model], "average")
    assert all(torch.equal(merged[name], value) for name, value in model.items())


def test_cart_through_the_registry_is_cart_merge():
    models, base = tasks_and_base(3)
    expected = lm.cart_merge(models, rank_ratio=0.25, scale=1.5)
    for merged in (
        lm.merge(models, "cart", rank_ratio=0.25, scale=1.5),
        lm.merge(models, rank_ratio=0.25, scale=1.5, base=base),
        methods.merge(models, method="cart", rank_ratio=0.25, scale=1.5),
    ):
        assert all(torch.equal(merged[name], value) for name, value in expected.items())


def test_task_arithmetic_with_scale_zero_is_the_base():
    models, base = tasks_and_base(3)
    merged = lm.merge(models, "task_arithmetic", base=base, scale=0.0)
    assert all(torch.equal(merged[name], value) for name, value in base.items())


@pytest.mark.parametrize("trim", ["tensor", "model"])
def test_ties_of_one_model_at_full_density_is_its_scaled_delta(trim):
    (model,), base = tasks_and_base(1)
    merged = lm.merge([model], "ties", base=base, density=1.0, scale=0.5, trim=trim, **FLOAT64)
    for name, value in base.items():
        if value.dtype.is_floating_point:
            expected = f64(value) + 0.5 * (f64(model[name]) - f64(value))
            assert relative_error(merged[name], expected) <= 1e-12, name


def test_tsv_of_one_model_is_its_scaled_delta():
    """T = 1 keeps every singular triplet, and the polar factor of an orthonormal U is U."""
    (model,), base = tasks_and_base(1)
    merged = lm.merge([model], "tsv", base=base, scale=2.0, **FLOAT64)
    for name, value in base.items():
        if value.dtype.is_floating_point:
            expected = f64(value) + 2.0 * (f64(model[name]) - f64(value))
            assert relative_error(merged[name], expected) <= 1e-10, name


def test_iso_cts_with_every_direction_common_is_iso_c():
    models, base = tasks_and_base(3)
    iso_c = lm.merge(models, "iso_c", base=base, scale=1.1)
    iso_cts = lm.merge(models, "iso_cts", base=base, scale=1.1, common_fraction=1.0)
    assert all(torch.equal(iso_cts[name], value) for name, value in iso_c.items())


def test_iso_c_keeps_a_flat_spectrum():
    """A task matrix whose singular values are already equal is its own Iso-C."""
    Q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    base = {"layer.weight": torch.zeros(12, 12, dtype=torch.float64)}
    merged = lm.merge([{"layer.weight": 0.1 * Q}], "iso_c", base=base, scale=1.0, compute_dtype=torch.float64)
    assert relative_error(merged["layer.weight"], 0.1 * Q) <= 1e-12


def tensor_source(models: Sequence[Mapping[str, Tensor]], base: Mapping[str, Tensor] | None) -> methods.TensorSource:
    """What a streaming merger feeds :func:`lm.prepare`: (name, tensors, base tensor) per name."""
    return lambda: ((name, [m[name] for m in models], None if base is None else base[name]) for name in models[0])


def test_per_tensor_entry_point_reproduces_the_whole_model_merge():
    """What a streaming merger does: prepare once, then one tensor name at a time."""
    models, base = tasks_and_base(3)
    labels = ["a", "b", "c"]
    for method, params in (("ties", {"trim": "model"}), ("tsv", {}), ("iso_cts", {}), ("cart", {})):
        settings = lm.method_settings(method, **params)
        source = tensor_source(models, base if settings.spec.needs_base else None)
        settings = lm.prepare(settings, source, labels)
        expected = lm.merge(models, method, base=base, **params)
        for name, tensors, base_tensor in source():
            got = lm.merge_method_tensor(name, tensors, base_tensor, settings, labels)
            assert torch.equal(got, expected[name]), (method, name)


def test_dtypes_devices_and_buffers():
    models, base = tasks_and_base(2)
    bf16 = [{name: t.to(torch.bfloat16) if t.is_floating_point() else t for name, t in m.items()} for m in models]
    for method in ("average", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"):
        merged = lm.merge(bf16, method, base=base)
        for name, value in merged.items():
            assert value.dtype == bf16[0][name].dtype, (method, name)
        assert torch.equal(merged["position_ids"], models[0]["position_ids"])
        assert lm.merge(models, method, base=base, out_dtype=torch.float16)["head.weight"].dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"])
def test_methods_on_the_gpu_match_the_cpu(method):
    """device="cuda" runs the math (decompositions, TIES's radix select) on the GPU; results come back to the CPU."""
    models, base = tasks_and_base(3)
    options = {} if method in ("task_arithmetic", "ties") else {"svd": "exact"}
    cpu = lm.merge(models, method, base=base, **FLOAT64, **options)
    gpu = lm.merge(models, method, base=base, device="cuda", **FLOAT64, **options)
    for name, value in cpu.items():
        assert gpu[name].device == value.device
        if value.dtype.is_floating_point:
            assert relative_error(gpu[name], value) <= 1e-10, name


def test_parameters_are_merged_without_autograd():
    """Parameters that require grad (e.g. mergekit hands over ``state_dict(keep_vars=True)``) record no graph."""
    models, base = tasks_and_base(2)
    parameters = [as_module(model).state_dict(keep_vars=True) for model in models]
    assert parameters[0]["head.weight"].requires_grad
    for method in ("ties", "iso_cts"):
        merged = lm.merge(parameters, method, base=base)
        assert not any(value.requires_grad for value in merged.values())
        expected = lm.merge(models, method, base=base)
        assert all(torch.equal(merged[name], value) for name, value in expected.items())


# ---------------------------------------------------------------------------
# Bad input, reported before any work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"])
def test_methods_on_task_vectors_need_a_base(method, forbid_decomposition):
    models, _ = tasks_and_base(2)
    with pytest.raises(ValueError, match=f"{method}.*needs base="):
        lm.merge(models, method)


@pytest.mark.parametrize(
    ("method", "params", "error", "message"),
    [
        ("bogus", {}, ValueError, "unknown merge method 'bogus'.*ties"),
        ("ties", {"density": 0.0}, ValueError, r"density must be in \(0, 1\], got 0.0"),
        ("ties", {"density": 1.5}, ValueError, r"density must be in \(0, 1\]"),
        ("ties", {"density": True}, TypeError, "density must be a number"),
        ("ties", {"trim": "layer"}, ValueError, "trim must be one of"),
        ("ties", {"svd": "exact"}, TypeError, "'ties' takes no parameter 'svd'"),
        ("tsv", {"density": 0.2}, TypeError, "'tsv' takes no parameter 'density'"),
        ("average", {"scale": 2.0}, TypeError, "'average' takes no parameter 'scale'"),
        ("iso_cts", {"common_fraction": 1.2}, ValueError, r"common_fraction must be in \[0, 1\]"),
        ("iso_c", {"scale": float("nan")}, ValueError, "scale must be a finite number"),
        ("tsv", {"rank_ratio": 0.0}, ValueError, r"rank_ratio must be in \(0, 1\]"),
        ("tsv", {"rank": 0}, ValueError, "rank must be >= 1"),
        ("iso_c", {"svd": "fast"}, ValueError, "unknown svd engine 'fast'"),
    ],
)
def test_bad_parameters(method, params, error, message, forbid_decomposition):
    models, base = tasks_and_base(2)
    with pytest.raises(error, match=message):
        lm.merge(models, method, base=base, **params)


def test_bad_base_is_named(forbid_decomposition):
    models, base = tasks_and_base(2)
    wrong = dict(base, **{"head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="'head.weight' has shape .* in base"):
        lm.merge(models, "tsv", base=wrong)
    nan_base = dict(base, **{"head.weight": torch.full_like(base["head.weight"], math.nan)})
    with pytest.raises(ValueError, match="'head.weight' of base contains NaN"):
        lm.merge(models, "iso_c", base=nan_base)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsv", "iso_c", "iso_cts"])
def test_per_tensor_merge_without_the_base_it_needs_is_refused(method):
    models, _ = tasks_and_base(2)
    settings = lm.method_settings(method)
    name = "head.weight"
    with pytest.raises(ValueError, match=f"merge method '{method}' needs base="):
        lm.merge_method_tensor(name, [m[name] for m in models], None, settings, ["a", "b"])


def test_whole_model_ties_without_its_prepass_is_refused():
    models, base = tasks_and_base(2)
    settings = lm.method_settings("ties", trim="model")
    name = "head.weight"
    with pytest.raises(RuntimeError, match="run prepare"):
        lm.merge_method_tensor(name, [m[name] for m in models], base[name], settings, ["a", "b"])
