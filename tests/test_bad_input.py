"""Every bad input is rejected with a clear ValueError/TypeError that names the
offending key and model, BEFORE any decomposition starts.

The ``forbid_decomposition`` fixture (conftest.py) replaces the per-layer ops
with a function that fails the test, and the bad tensor is always put LAST in
the state dicts, after the low-rank layers: a check that ran lazily, layer by
layer, would reach a decomposition first and fail the test.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import lowrank_merge as lm

from conftest import TinyBlock, as_module, make_models, make_pretrained

pytestmark = pytest.mark.usefixtures("forbid_decomposition")


def _merge(models, **kwargs):
    return lm.cart_merge(models, **kwargs)


def _decompose(models, **kwargs):
    return lm.cart_decompose(models, **kwargs)


ENTRY_POINTS = pytest.mark.parametrize("entry", [_merge, _decompose], ids=["cart_merge", "cart_decompose"])


def _models(T=3, last="head.weight", dtype=torch.float32):
    """Models whose key ``last`` comes after every other key (and every low-rank layer)."""
    models = make_models(T, 16, seed=0, dtype=dtype)
    return [{**{n: t for n, t in m.items() if n != last}, last: m[last]} for m in models]


def test_decomposition_is_really_forbidden():
    """The fixture works: a valid merge reaches a decomposition and fails."""
    with pytest.raises(pytest.fail.Exception, match="decomposition started"):
        lm.cart_merge(_models(), rank_ratio=0.25)


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@ENTRY_POINTS
@pytest.mark.parametrize("models", [[], ()])
def test_no_models(entry, models):
    with pytest.raises(ValueError, match="no models to merge"):
        entry(models)


@ENTRY_POINTS
@pytest.mark.parametrize(
    "models, match",
    [
        (make_models(1, 8)[0], "models must be a sequence"),  # one state dict, not a list of them
        (TinyBlock(8), "models must be a sequence"),
        ((m for m in make_models(2, 8)), "models must be a sequence"),  # a generator
        ({0: 1}, "models must be a sequence"),
        (None, "models must be a sequence"),
        (7, "models must be a sequence"),
        ("model.pt", "model 0 is a str"),  # a sequence, but of characters
        ([make_models(1, 8)[0], 3], "model 1 is a int"),
        ([make_models(1, 8)[0], ["w"]], "model 1 is a list"),
    ],
)
def test_models_not_a_sequence_of_state_dicts(entry, models, match):
    with pytest.raises(TypeError, match=match):
        entry(models)


@ENTRY_POINTS
@pytest.mark.parametrize(
    "value, kind",
    [([[1.0, 2.0]], "list"), (np.zeros((5, 16), dtype=np.float32), "ndarray"), (0.5, "float"), (None, "NoneType")],
)
def test_value_that_is_not_a_tensor(entry, value, kind):
    models = _models()
    models[2]["head.weight"] = value
    with pytest.raises(TypeError, match=rf"model 2: value of 'head\.weight' is a {kind}, not a torch\.Tensor"):
        entry(models)


@ENTRY_POINTS
def test_missing_keys_are_listed(entry):
    models = _models()
    del models[1]["blocks.0.mlp.c_fc.weight"]
    del models[1]["head.weight"]
    with pytest.raises(
        ValueError,
        match=r"model 1 lacks \['blocks\.0\.mlp\.c_fc\.weight', 'head\.weight'\] found in model 0",
    ):
        entry(models)


@ENTRY_POINTS
def test_extra_keys_are_listed(entry):
    models = _models()
    models[2]["extra.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"model 2 has \['extra\.weight'\] not found in model 0"):
        entry(models)


@ENTRY_POINTS
def test_missing_keys_of_the_first_model(entry):
    models = _models()
    del models[0]["head.weight"]
    with pytest.raises(ValueError, match=r"model 1 has \['head\.weight'\] not found in model 0"):
        entry(models)


@ENTRY_POINTS
def test_many_missing_keys_are_summarised(entry):
    models = _models()
    models[1] = {"head.weight": models[1]["head.weight"]}
    with pytest.raises(ValueError, match=r"model 1 lacks \['token_embedding\.weight', .* and \d+ more\] found"):
        entry(models)


@ENTRY_POINTS
@pytest.mark.parametrize("shape", [(6, 16), (16, 5), (80,), (1, 5, 16)])
def test_mismatched_shape(entry, shape):
    models = _models()
    models[2]["head.weight"] = torch.zeros(shape)
    expected = rf"tensor 'head\.weight' has shape {re_list(shape)} in model 2 but \[5, 16\] in model 0"
    with pytest.raises(ValueError, match=expected):
        entry(models)


def re_list(shape):
    return r"\[" + ", ".join(str(s) for s in shape) + r"\]"


@ENTRY_POINTS
@pytest.mark.parametrize(
    "name, dtype, match",
    [
        ("head.weight", torch.int32, r"tensor 'head\.weight' is torch\.int32 in model 1 but torch\.float32 in model 0"),
        ("position_ids", torch.float32, r"tensor 'position_ids' is torch\.float32 in model 1 but torch\.int64 in model 0"),
        ("blocks.0.attn.mask", torch.uint8, r"tensor 'blocks\.0\.attn\.mask' is torch\.uint8 in model 1 but torch\.bool"),
        ("head.weight", torch.complex64, r"tensor 'head\.weight' is torch\.complex64 in model 1"),
    ],
)
def test_mismatched_dtype_kind(entry, name, dtype, match):
    models = _models(last=name)
    models[1][name] = models[1][name].to(dtype)
    with pytest.raises(ValueError, match=match):
        entry(models)


def test_different_floating_dtypes_are_compatible():
    """Only the dtype *kind* must agree: float16 and float32 models merge."""
    models = _models()
    models[1] = {n: (t.half() if t.dtype.is_floating_point else t) for n, t in models[1].items()}
    with pytest.raises(pytest.fail.Exception, match="decomposition started"):  # i.e. it got past the checks
        lm.cart_merge(models, rank_ratio=0.25)


@ENTRY_POINTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "bad, word", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")], ids=["nan", "inf", "-inf"]
)
def test_non_finite_values(entry, bad, word, dtype):
    models = _models(dtype=dtype)
    models[2]["head.weight"] = models[2]["head.weight"].clone()
    models[2]["head.weight"][3, 7] = bad
    with pytest.raises(ValueError, match=rf"tensor 'head\.weight' of model 2 contains {word} values"):
        entry(models)


@ENTRY_POINTS
def test_non_finite_value_in_an_averaged_tensor(entry):
    models = _models(last="ln_final.bias")
    models[1]["ln_final.bias"] = models[1]["ln_final.bias"].clone()
    models[1]["ln_final.bias"][0] = math.nan
    with pytest.raises(ValueError, match=r"tensor 'ln_final\.bias' of model 1 contains NaN values"):
        entry(models)


@ENTRY_POINTS
@pytest.mark.parametrize("name", ["position_ids", "blocks.0.attn.mask"])
def test_differing_non_floating_buffers(entry, name):
    models = _models(last=name)
    changed = models[2][name].clone()
    changed.view(-1)[1] = ~changed.view(-1)[1] if changed.dtype == torch.bool else changed.view(-1)[1] + 1
    models[2][name] = changed
    with pytest.raises(
        ValueError, match=rf"non-floating tensor '{name}' differs between model 0 and model 2.*cannot be averaged"
    ):
        entry(models)


# ---------------------------------------------------------------------------
# base
# ---------------------------------------------------------------------------


@ENTRY_POINTS
def test_base_with_a_different_shape(entry):
    models = _models()
    base = make_pretrained(16)
    base["head.weight"] = torch.zeros(6, 16)
    with pytest.raises(ValueError, match=r"tensor 'head\.weight' has shape \[6, 16\] in base but \[5, 16\] in model 0"):
        entry(models, base=base)


@ENTRY_POINTS
def test_base_with_missing_keys(entry):
    base = make_pretrained(16)
    del base["blocks.0.ln_2.bias"]
    with pytest.raises(ValueError, match=r"base lacks \['blocks\.0\.ln_2\.bias'\] found in model 0"):
        entry(_models(), base=base)


@ENTRY_POINTS
@pytest.mark.parametrize("base, match", [(3, "base is a int"), ([torch.zeros(2)], "base is a list")])
def test_base_of_the_wrong_type(entry, base, match):
    with pytest.raises(TypeError, match=match):
        entry(_models(), base=base)


@ENTRY_POINTS
def test_base_of_another_architecture_as_module(entry):
    with pytest.raises(ValueError, match=r"tensor '.*' has shape .* in base but .* in model 0"):
        entry(_models(), base=as_module(make_pretrained(8), d=8))


# ---------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------


@ENTRY_POINTS
@pytest.mark.parametrize("rank_ratio", [0, 0.0, -0.1, 1.5, 1.0000001, math.nan, math.inf, -math.inf])
def test_rank_ratio_outside_unit_interval(entry, rank_ratio):
    with pytest.raises(ValueError, match=r"rank_ratio must be in \(0, 1\], got"):
        entry(_models(), rank_ratio=rank_ratio)


@ENTRY_POINTS
@pytest.mark.parametrize("rank_ratio", ["0.1", None, True, [0.1], 1j])
def test_rank_ratio_not_a_number(entry, rank_ratio):
    with pytest.raises(TypeError, match="rank_ratio must be a number in"):
        entry(_models(), rank_ratio=rank_ratio)


@ENTRY_POINTS
@pytest.mark.parametrize(
    "rank, error, match",
    [
        (2.5, TypeError, r"rank must be an integer, got 2\.5"),
        (2.0, TypeError, r"rank must be an integer, got 2\.0"),
        ("4", TypeError, r"rank must be an integer, got '4'"),
        (True, TypeError, r"rank must be an integer, got True"),
        (-1, ValueError, r"rank must be >= 1, got -1"),
        (0, ValueError, r"rank must be >= 1, got 0"),
    ],
)
def test_bad_rank(entry, rank, error, match):
    with pytest.raises(error, match=match):
        entry(_models(), rank=rank)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, "2", None, True])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be a finite number, got"):
        lm.cart_merge(_models(), scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite number, got"):
        lm.cart_layer(torch.zeros(2, 4, 3), 1, scale)


def test_bad_scale_of_merged(monkeypatch):
    models = make_models(2, 8)
    monkeypatch.undo()  # decomposing is allowed here: the scale comes after it
    decomposed = lm.cart_decompose(models)
    for scale in (math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            decomposed.merged(scale)


@ENTRY_POINTS
@pytest.mark.parametrize("svd", ["fast", "EXACT", "svd", "lanczos", "", None])
def test_unknown_svd_engine(entry, svd):
    with pytest.raises(ValueError, match=r"unknown svd engine .*; choose one of \('auto', 'exact', 'randomized'"):
        entry(_models(), svd=svd)


@ENTRY_POINTS
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"niter": -1}, ValueError, "niter must be >= 0, got -1"),
        ({"niter": 1.5}, TypeError, r"niter must be an integer, got 1\.5"),
        ({"oversample": -2}, ValueError, "oversample must be >= 0, got -2"),
        ({"oversample": "5"}, TypeError, "oversample must be an integer"),
        ({"seed": -1}, ValueError, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
        ({"seed": 2**70}, ValueError, "seed must be an integer"),
        ({"seed": 1.5}, ValueError, r"seed must be an integer .*got 1\.5"),
        ({"seed": "7"}, ValueError, "seed must be an integer"),
        ({"seed": None}, ValueError, "seed must be an integer"),
    ],
)
def test_bad_iteration_parameters(entry, kwargs, error, match):
    with pytest.raises(error, match=match):
        entry(_models(), **kwargs)


@ENTRY_POINTS
@pytest.mark.parametrize("argument", ["include", "exclude"])
@pytest.mark.parametrize("pattern", ["attn(", "[mlp", ["ok", "*bad"]])
def test_bad_regular_expression(entry, argument, pattern):
    bad = re.escape(pattern if isinstance(pattern, str) else pattern[1])
    with pytest.raises(ValueError, match=rf"{argument} pattern '{bad}' is not a valid regular expression"):
        entry(_models(), **{argument: pattern})


@ENTRY_POINTS
@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_non_string_pattern(entry, argument):
    with pytest.raises(TypeError, match=rf"{argument} patterns must be strings, got int"):
        entry(_models(), **{argument: ["attn", 3]})


@ENTRY_POINTS
@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16, torch.int32, "float32"])
def test_compute_dtype_must_be_float32_or_float64(entry, compute_dtype):
    with pytest.raises(ValueError, match="compute_dtype must be torch.float32 or torch.float64"):
        entry(_models(), compute_dtype=compute_dtype)


@ENTRY_POINTS
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.bool, "float16"])
def test_out_dtype_must_be_floating(entry, out_dtype):
    with pytest.raises(ValueError, match="out_dtype must be a floating torch.dtype"):
        entry(_models(), out_dtype=out_dtype)


# ---------------------------------------------------------------------------
# Layer-level functions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stack, k, match",
    [
        (
            torch.zeros(4, 3),
            1,
            r"stack must be a floating tensor of shape \[T, m, n\], got torch\.float32 tensor of shape \[4, 3\]",
        ),
        (torch.zeros(2, 2, 4, 3), 1, r"shape \[T, m, n\], got torch\.float32 tensor of shape \[2, 2, 4, 3\]"),
        (torch.zeros(2, 4, 3, dtype=torch.int64), 1, r"got torch\.int64 tensor"),
        ([[[0.0]]], 1, r"got list"),
        (torch.zeros(2, 4, 3), 0, "k must be a positive integer, got 0"),
        (torch.zeros(2, 4, 3), 2.0, r"k must be a positive integer, got 2\.0"),
        (torch.zeros(2, 4, 3), True, "k must be a positive integer, got True"),
    ],
)
def test_bad_layer_arguments(stack, k, match):
    with pytest.raises(ValueError, match=match):
        lm.cart_layer(stack, k, 1.0)
    with pytest.raises(ValueError, match=match):
        lm.cart_layer_parts(stack, k)


@pytest.mark.parametrize("bad, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_layer_stack_names_the_task(bad, word):
    """Centering would spread one task's NaN to every task: the building blocks
    check the stack first and name the task that holds it."""
    stack = torch.randn(3, 8, 6)
    stack[1, 2, 3] = bad
    with pytest.raises(ValueError, match=f"tensor 'stack' of task 1 contains {word} values"):
        lm.cart_layer(stack, 2, 1.0)
    with pytest.raises(ValueError, match=f"tensor 'stack' of task 1 contains {word} values"):
        lm.cart_layer_parts(stack, 2)


def test_non_finite_low_rank_approx_input():
    A = torch.randn(8, 6)
    A[0, 0] = float("inf")
    with pytest.raises(ValueError, match="tensor 'A' of the input contains Inf values"):
        lm.low_rank_approx(A, 2)


def test_cart_decompose_takes_no_scale():
    with pytest.raises(TypeError, match=r"cart_decompose takes no scale: give λ to \.merged\(scale\)"):
        lm.cart_decompose(_models(), scale=3.0)


def test_bad_layer_settings():
    stack = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="unknown svd engine 'nope'"):
        lm.cart_layer(stack, 1, svd="nope")
    with pytest.raises(ValueError, match="compute_dtype must be"):
        lm.cart_layer_parts(stack, 1, compute_dtype=torch.float16)


@pytest.mark.parametrize(
    "A, k, match",
    [
        (
            torch.zeros(5),
            1,
            r"A must be a float32 or float64 tensor of shape \[\.\.\., m, n\], got torch\.float32 tensor of shape \[5\]",
        ),
        (torch.zeros(4, 3, dtype=torch.bfloat16), 1, r"got torch\.bfloat16 tensor"),
        (np.zeros((4, 3)), 1, "got ndarray"),
        (torch.zeros(4, 3), 0, "k must be a positive integer, got 0"),
        (torch.zeros(4, 3), -2, "k must be a positive integer, got -2"),
        (torch.zeros(4, 3), 1.0, r"k must be a positive integer, got 1\.0"),
    ],
)
def test_bad_low_rank_approx_arguments(A, k, match):
    with pytest.raises(ValueError, match=match):
        lm.low_rank_approx(A, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_huge_finite_values_are_not_mistaken_for_inf(dtype):
    """The finiteness check sums first; a sum that overflows from finite values
    must not be reported as Inf (it falls back to the elementwise test)."""
    from lowrank_merge.validation import check_tensor_values

    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)
    check_tensor_values("w", [big, big], ["model 0", "model 1"])  # no error
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")):
        broken = big.clone()
        broken[7] = bad
        with pytest.raises(ValueError, match=f"tensor 'w' of model 1 contains {word} values"):
            check_tensor_values("w", [big, broken], ["model 0", "model 1"])
