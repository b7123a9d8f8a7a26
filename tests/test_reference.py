"""The exact path (svd="exact") against the independent float64 reference of
conftest.py, key selection, dtypes, nn.Module inputs and the rank rule."""

from __future__ import annotations

import math

import pytest
import torch

import lowrank_merge as lm
from lowrank_merge.validation import TensorMeta

from conftest import (
    EXPECTED_DEFAULT_LOW_RANK,
    EXPECTED_REFERENCE_LOW_RANK,
    as_module,
    assert_matches_reference,
    default_selects,
    input_dtypes,
    make_models,
    reference_cart,
    reference_layer,
    reference_low_rank_keys,
    reference_preset_selects,
    reference_truncated,
    relative_error,
)

# Tolerance of float32 computation against the float64 reference, as a
# Frobenius norm relative to each tensor's own norm.
#
# * Averaging T float32 values costs about one rounding, ~6e-8 relative.
# * The low-rank part λ Σ_t SVD_k(τ̄_t) is built from task vectors ~1e-2 of the
#   weight. A float32 SVD is backward stable (error ~ c·eps·‖τ̄‖ with
#   eps = 1.2e-7), and the truncated reconstruction amplifies that by at most
#   ‖τ̄‖ / (σ_k − σ_{k+1}), ~10-100 for these random deltas; times λ = 2 and
#   T <= 5 tasks, still ~1e-6 of the weight (the worst we measured over 80
#   random cases is 1.2e-6, on the 16 x 3 matrix).
# * 1e-5 (~80 eps_32) leaves a ~10x margin, yet any error in the method (k off
#   by one, a missing centering, a wrong λ) moves the result by ~λ·σ_{k+1}(τ̄),
#   i.e. >= 1e-4 of the weight: test_tolerance_detects_method_errors checks it.
FLOAT32_RTOL = 1e-5
# float64 computation: the same analysis with eps = 2.2e-16.
FLOAT64_RTOL = 1e-11


@pytest.mark.parametrize(
    "T, d, rank_ratio, scale",
    [(2, 16, 0.25, 2.0), (3, 24, 0.08, 2.0), (4, 16, 0.5, 1.3), (5, 32, 0.3, -0.7)],
)
def test_exact_matches_float64_reference(T, d, rank_ratio, scale):
    models = make_models(T, d, seed=T)
    result = lm.cart_merge(models, rank_ratio=rank_ratio, scale=scale, svd="exact")
    reference = reference_cart(models, rank_ratio=rank_ratio, scale=scale)
    assert_matches_reference(result, reference, rtol=FLOAT32_RTOL, dtypes=input_dtypes(models[0]))
    # The result keeps the first model's key order.
    assert list(result) == list(models[0])


def test_exact_matches_reference_with_reference_preset():
    models = make_models(4, 16, seed=7)
    preset = lm.key_preset("reference")
    result = lm.cart_merge(models, rank_ratio=0.25, svd="exact", **preset)
    reference = reference_cart(models, select=reference_preset_selects, rank_ratio=0.25)
    assert_matches_reference(result, reference, rtol=FLOAT32_RTOL, dtypes=input_dtypes(models[0]))


def test_tolerance_detects_method_errors():
    """The reference comparison above would catch a wrong k, λ or centering."""
    models = make_models(4, 16, seed=3)
    result = lm.cart_merge(models, rank_ratio=0.25, scale=2.0, svd="exact")
    checked = [n for n in EXPECTED_DEFAULT_LOW_RANK if min(models[0][n].shape) > 4]  # k = 4 < min(m, n)
    assert checked
    wrong_references = {
        "k + 1": reference_cart(models, rank_ratio=0.25, ranks={n: 5 for n in checked}),
        "1.02 λ": reference_cart(models, rank_ratio=0.25, scale=2.04),
    }
    for label, wrong in wrong_references.items():
        for name in checked:
            assert relative_error(result[name], wrong[name]) > 10 * FLOAT32_RTOL, (label, name)
    # Without centering: SVD_k of θ_t − θ_0 (θ_0 = the first model) instead of θ_t − θ_avg.
    for name in checked:
        stack = [m[name].double() for m in models]
        average = sum(stack) / len(stack)
        uncentered = average + 2.0 * sum(reference_truncated(t - stack[0], 4) for t in stack)
        assert relative_error(result[name], uncentered) > 10 * FLOAT32_RTOL, name


def test_cart_layer_matches_reference_layer():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(30, 20, generator=g, dtype=torch.float64)
    stack = torch.stack([base + 1e-2 * torch.randn(30, 20, generator=g, dtype=torch.float64) for _ in range(3)]).float()
    merged = lm.cart_layer(stack, 4, 1.7, svd="exact")
    assert merged.shape == (30, 20) and merged.dtype == torch.float32
    assert relative_error(merged, reference_layer(list(stack), 4, 1.7)) <= FLOAT32_RTOL
    average, delta = lm.cart_layer_parts(stack, 4, svd="exact")
    assert average.dtype == delta.dtype == torch.float32
    assert relative_error(average, stack.double().mean(0)) <= FLOAT32_RTOL
    expected_delta = reference_layer(list(stack), 4, 1.0) - stack.double().mean(0)
    assert relative_error(delta, expected_delta) <= 1e-4  # relative to the (100x smaller) delta itself


# ---------------------------------------------------------------------------
# Key selection
# ---------------------------------------------------------------------------


def _planned_low_rank(models, **kwargs) -> set[str]:
    settings = lm.MergeSettings.create(**kwargs)
    return {
        name
        for name, t in models[0].items()
        if lm.plan_tensor(name, TensorMeta.of(t), settings).action == "low_rank"
    }


def _changed_by_scale(models, **kwargs) -> set[str]:
    """Keys whose merged value depends on λ: observed, not planned."""
    a = lm.cart_merge(models, scale=0.0, svd="exact", **kwargs)
    b = lm.cart_merge(models, scale=2.0, svd="exact", **kwargs)
    return {name for name in a if not torch.equal(a[name], b[name])}


@pytest.mark.parametrize(
    "preset, expected, selector",
    [
        (None, EXPECTED_DEFAULT_LOW_RANK, default_selects),
        ("default", EXPECTED_DEFAULT_LOW_RANK, default_selects),
        ("reference", EXPECTED_REFERENCE_LOW_RANK, reference_preset_selects),
    ],
)
def test_selected_keys(preset, expected, selector):
    models = make_models(3, 16, seed=1)
    kwargs = {} if preset is None else lm.key_preset(preset)
    # The reference's own selection agrees with the hand-written expectation ...
    assert reference_low_rank_keys(models, selector) == expected
    # ... and so does the library's plan ...
    assert _planned_low_rank(models, rank_ratio=0.25, **kwargs) == expected
    # ... and its observable behaviour: exactly the selected keys with k < min(m, n) depend on λ
    # (the 1 x 16 gate is selected but at full rank, where Σ_t τ̄_t = 0).
    observable = {n for n in expected if min(models[0][n].shape) > 1}
    assert _changed_by_scale(models, rank_ratio=0.25, **kwargs) == observable


# (name, default preset low-ranks it, reference preset low-ranks it); all 2-D floating.
NAMES = [
    ("transformer.wte.weight", False, False),
    ("transformer.wpe.weight", False, False),
    ("transformer.h.0.attn.c_attn.weight", True, True),
    ("transformer.h.0.attn.c_attn.bias", True, False),  # 2-D here to test the name rule
    ("transformer.h.0.mlp.c_fc.weight", True, True),
    ("transformer.h.0.ln_1.weight", False, False),
    ("transformer.ln_f.weight", False, False),
    ("lm_head.weight", False, False),
    ("model.embed_tokens.weight", False, False),
    ("model.layers.0.self_attn.q_proj.weight", True, True),
    ("model.layers.0.mlp.down_proj.weight", True, True),
    ("model.layers.0.input_layernorm.weight", False, False),
    ("model.norm.weight", False, False),
    ("shared.weight", False, False),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", True, False),  # no "attn" substring
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False, False),  # T5: a lookup table
    ("visual.transformer.resblocks.0.attn.in_proj_weight", True, True),
    ("visual.transformer.resblocks.0.mlp.c_proj.weight", True, True),
    ("visual.positional_embedding", False, False),
    ("visual.proj", True, False),
    ("text_projection", True, False),
    ("vit.encoder.layer.0.attention.output.dense.weight", True, False),
    ("blocks.0.attn.kiln_proj.weight", True, False),  # reference: plain substring "ln"
]


@pytest.mark.parametrize("name, default, reference", NAMES)
def test_selection_of_common_names(name, default, reference):
    tensor = torch.zeros(6, 4)
    meta = TensorMeta.of(tensor)
    for kwargs, expected, selector in [
        ({}, default, default_selects),
        (lm.key_preset("reference"), reference, reference_preset_selects),
    ]:
        settings = lm.MergeSettings.create(**kwargs)
        assert selector(name, tensor) == expected
        assert (lm.plan_tensor(name, meta, settings).action == "low_rank") == expected, (name, kwargs)


@pytest.mark.parametrize("shape, dtype", [((6,), torch.float32), ((2, 3, 4), torch.float32), ((6, 4), torch.int64)])
def test_only_floating_matrices_are_low_ranked(shape, dtype):
    tensor = torch.zeros(shape, dtype=dtype)
    for kwargs in ({}, lm.key_preset("reference"), lm.key_preset("all")):
        plan = lm.plan_tensor("blocks.0.attn.c_attn.weight", TensorMeta.of(tensor), lm.MergeSettings.create(**kwargs))
        assert plan.action == ("copy" if dtype == torch.int64 else "average")


def test_key_presets_are_the_documented_filters():
    assert lm.key_preset("reference") == {"include": ("attn", "mlp"), "exclude": ("ln", "bias")}
    assert lm.key_preset("all") == {"include": None, "exclude": ()}
    with pytest.raises(ValueError, match="unknown key preset 'nope'"):
        lm.key_preset("nope")
    # "all" low-ranks the embeddings too.
    models = make_models(2, 8, seed=0)
    assert _planned_low_rank(models, **lm.key_preset("all")) == EXPECTED_DEFAULT_LOW_RANK | {
        "token_embedding.weight",
        "positional_embedding",
    }


def test_include_and_exclude_arguments():
    models = make_models(3, 16, seed=2)
    planned = _planned_low_rank(models, include=r"mlp\.c_(fc|proj)\.weight$")
    assert planned == {"blocks.0.mlp.c_fc.weight", "blocks.0.mlp.c_proj.weight"}
    planned = _planned_low_rank(models, include=["attn"], exclude=["gate", "rel_"])
    assert planned == {"blocks.0.attn.in_proj_weight", "blocks.0.attn.out_proj.weight"}
    # include only: exclude defaults to DEFAULT_EXCLUDE, so embeddings stay averaged.
    assert _planned_low_rank(models, include="embed|c_fc") == {"blocks.0.mlp.c_fc.weight"}


# ---------------------------------------------------------------------------
# Dtypes
# ---------------------------------------------------------------------------


def test_bfloat16_inputs_give_bfloat16_outputs_computed_in_float32():
    models = make_models(3, 16, seed=4, dtype=torch.bfloat16)
    reference = reference_cart(models, rank_ratio=0.25)  # from the bf16 values, in float64
    result = lm.cart_merge(models, rank_ratio=0.25, svd="exact")
    for name, expected in reference.items():
        got = result[name]
        assert got.dtype == models[0][name].dtype, name
        if not expected.dtype.is_floating_point:
            assert torch.equal(got, expected)
            continue
        # A float32 result rounded to bf16 is within half a bf16 ulp (<= 2^-8 |x|) of the exact
        # value, plus the float32 error; bf16 arithmetic would be off by several ulps.
        bound = 2.0**-8 * expected.abs() * (1 + 1e-3) + 1e-5 * expected.abs().max()
        assert bool(((got.double() - expected).abs() <= bound).all()), name
    # out_dtype=float32 exposes the float32 math itself: float32 rounding, not bf16 (~4e-3).
    result32 = lm.cart_merge(models, rank_ratio=0.25, svd="exact", out_dtype=torch.float32)
    assert_matches_reference(
        result32, reference, rtol=FLOAT32_RTOL, dtypes=input_dtypes(models[0], torch.float32)
    )


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_out_dtype(out_dtype):
    models = make_models(3, 16, seed=5)
    result = lm.cart_merge(models, rank_ratio=0.25, svd="exact", out_dtype=out_dtype)
    reference = reference_cart(models, rank_ratio=0.25)
    rtol = FLOAT32_RTOL if out_dtype == torch.float64 else 2.0**-8  # rounding to a 16-bit output
    assert_matches_reference(result, reference, rtol=rtol, dtypes=input_dtypes(models[0], out_dtype))
    assert result["position_ids"].dtype == torch.int64 and result["blocks.0.attn.mask"].dtype == torch.bool


def test_mixed_floating_dtypes_follow_each_input():
    models = make_models(3, 16, seed=6)
    models[0]["head.weight"] = models[0]["head.weight"].half()  # other models keep float32
    result = lm.cart_merge(models, rank_ratio=0.25, svd="exact")
    assert result["head.weight"].dtype == torch.float16  # the first model's dtype
    reference = reference_cart(models, rank_ratio=0.25)
    assert relative_error(result["head.weight"], reference["head.weight"]) <= 2.0**-10


def test_compute_dtype_float64():
    models = make_models(4, 16, seed=8)
    reference = reference_cart(models, rank_ratio=0.25)
    result = lm.cart_merge(models, rank_ratio=0.25, svd="exact", compute_dtype=torch.float64)
    for name, expected in reference.items():
        got = result[name]
        assert got.dtype == models[0][name].dtype, name  # output dtype = input dtype
        if expected.dtype.is_floating_point:
            # float64 math, then one rounding to float32: within half an ulp of the exact value.
            bound = 2.0**-24 * expected.abs() * (1 + 1e-6) + 1e-12 * expected.abs().max()
            assert bool(((got.double() - expected).abs() <= bound).all()), name
    result64 = lm.cart_merge(
        models, rank_ratio=0.25, svd="exact", compute_dtype=torch.float64, out_dtype=torch.float64
    )
    assert_matches_reference(result64, reference, rtol=FLOAT64_RTOL, dtypes=input_dtypes(models[0], torch.float64))


# ---------------------------------------------------------------------------
# nn.Module inputs
# ---------------------------------------------------------------------------


def test_module_inputs():
    models = make_models(3, 16, seed=9)
    modules = [as_module(m) for m in models]
    from_modules = lm.cart_merge(modules, rank_ratio=0.25, svd="exact")
    from_dicts = lm.cart_merge(models, rank_ratio=0.25, svd="exact")
    assert set(from_modules) == set(from_dicts)
    for name in from_dicts:
        assert torch.equal(from_modules[name], from_dicts[name]), name
    assert_matches_reference(
        from_modules, reference_cart(models, rank_ratio=0.25), rtol=FLOAT32_RTOL, dtypes=input_dtypes(models[0])
    )
    # A merged state dict loads back into the architecture.
    as_module(from_modules)
    # Modules and dicts can be mixed.
    mixed = lm.cart_merge([modules[0], models[1], modules[2]], rank_ratio=0.25, svd="exact")
    for name in from_dicts:
        assert torch.equal(mixed[name], from_dicts[name]), name


def test_state_dicts_of_parameters():
    """dict(model.named_parameters()) holds tensors that require grad: they merge like their values."""
    models = make_models(3, 16, seed=12)
    as_parameters = [
        {n: (torch.nn.Parameter(t.clone()) if t.dtype.is_floating_point else t) for n, t in m.items()}
        for m in models
    ]
    expected = lm.cart_merge(models, rank_ratio=0.25, svd="exact")
    for result in (
        lm.cart_merge(as_parameters, rank_ratio=0.25, svd="exact"),
        lm.cart_decompose(as_parameters, rank_ratio=0.25, svd="exact").merged(2.0),
    ):
        for name in expected:
            assert not result[name].requires_grad, name  # merged weights are data, not a graph
            assert torch.equal(result[name], expected[name]), name


# ---------------------------------------------------------------------------
# Rank rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, rank_ratio, rank, expected",
    [
        ((768, 768), 0.08, None, 61),  # floor(61.44)
        ((3072, 768), 0.08, None, 61),
        ((768, 3072), 0.08, None, 61),
        ((10, 20), 0.25, None, 2),  # floor(2.5), not round
        ((7, 9), 0.999, None, 6),  # floor(6.993)
        ((100, 50), 1.0, None, 50),
        ((3, 5), 0.08, None, 1),  # max(1, floor(0.24))
        ((1, 100), 0.5, None, 1),
        ((100, 1), 0.08, None, 1),
        ((30, 40), 0.9, 5, 5),  # rank overrides rank_ratio
        ((3, 10), 0.08, 5, 3),  # clipped to min(m, n)
        ((10, 3), 0.08, 5, 3),
        ((64, 64), 0.08, 64, 64),
    ],
)
def test_rank_for(shape, rank_ratio, rank, expected):
    assert lm.rank_for(shape, rank_ratio, rank) == expected


# d = 16, rank_ratio = 0.3: min 16 -> floor(4.8) = 4; 16 x 3 -> max(1, floor(0.9)) = 1;
# 5 x 16 -> floor(1.5) = 1; 1 x 16 -> max(1, floor(0.3)) = 1 (full rank).
RATIO_03_RANKS = {
    "blocks.0.attn.in_proj_weight": 4,
    "blocks.0.attn.out_proj.weight": 4,
    "blocks.0.mlp.c_fc.weight": 4,
    "blocks.0.mlp.c_proj.weight": 4,
    "blocks.0.attn.rel_proj.weight": 1,
    "head.weight": 1,
    "blocks.0.attn.gate.weight": 1,
}


def test_rank_ratio_uses_floor_and_at_least_one():
    models = make_models(3, 16, seed=10)
    result = lm.cart_merge(models, rank_ratio=0.3, svd="exact")
    dtypes = input_dtypes(models[0])
    assert_matches_reference(result, reference_cart(models, ranks=RATIO_03_RANKS), rtol=FLOAT32_RTOL, dtypes=dtypes)
    # Rounding instead of floor (5 and 2), or no max(1, ·) (rank 0 = the average), would be detected.
    rounded = reference_cart(models, ranks={**RATIO_03_RANKS, "blocks.0.mlp.c_fc.weight": 5, "head.weight": 2})
    assert relative_error(result["blocks.0.mlp.c_fc.weight"], rounded["blocks.0.mlp.c_fc.weight"]) > 1e-4
    assert relative_error(result["head.weight"], rounded["head.weight"]) > 1e-4
    average = reference_cart(models, scale=0.0)
    assert relative_error(result["blocks.0.attn.rel_proj.weight"], average["blocks.0.attn.rel_proj.weight"]) > 1e-4


def test_fixed_rank_overrides_ratio_and_is_clipped():
    models = make_models(3, 16, seed=11)
    result = lm.cart_merge(models, rank=2, rank_ratio=0.9, svd="exact")
    ranks = {name: min(2, *models[0][name].shape) for name in EXPECTED_DEFAULT_LOW_RANK}
    assert ranks["blocks.0.attn.gate.weight"] == 1
    assert_matches_reference(
        result, reference_cart(models, ranks=ranks), rtol=FLOAT32_RTOL, dtypes=input_dtypes(models[0])
    )
    # A rank above every min(m, n) is clipped to full rank, where CART is the plain average.
    huge = lm.cart_merge(models, rank=10**6, svd="exact")
    assert_matches_reference(
        huge, reference_cart(models, scale=0.0), rtol=FLOAT32_RTOL, dtypes=input_dtypes(models[0])
    )


def test_layer_functions_clip_k():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(3, 6, 4, generator=g)
    merged = lm.cart_layer(stack, 100, 2.0, svd="exact")
    assert relative_error(merged, stack.double().mean(0)) <= FLOAT32_RTOL
    merged = lm.cart_layer(stack, 3, 2.0, svd="exact")
    assert relative_error(merged, reference_layer(list(stack), 3, 2.0)) <= FLOAT32_RTOL
    assert math.isfinite(float(merged.sum()))
