"""Shared helpers of the core test suite.

The heart of this file is :func:`reference_cart`, an independent float64
implementation of CART written from the paper's definition, NOT from the
library: it imports nothing from ``lowrank_merge``, takes a dense
``torch.linalg.svd`` of every centered task vector one task and one matrix at a
time, and decides which keys are low-ranked with its own selection functions
(:func:`reference_preset_selects`, :func:`default_selects`).

CART (Choi et al. 2024):
    θ_avg = mean_t θ_t,  τ̄_t = θ_t − θ_avg,
    θ = θ_avg + λ · Σ_t SVD_k(τ̄_t)   for each selected 2-D weight,
    k = max(1, floor(rank_ratio · min(m, n)))  (a fixed rank overrides it,
        clipped to min(m, n));
    every other floating tensor ends at θ_avg; non-floating tensors are copied.

:func:`make_models` builds random "models" with the structure of fine-tuned
transformers: shared pretrained weights plus small (~1e-2 relative) task deltas,
with CLIP/GPT-2 style names and odd shapes (tall, wide, square, 1 x n, n x 3,
0-d), an embedding, LayerNorms, biases, an int buffer and a bool buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------
# Model builder
# ---------------------------------------------------------------------------

#: Relative size of a task delta with respect to the pretrained weight (RMS).
TASK_DELTA = 1e-2


def model_spec(d: int, *, vocab: int = 11, ctx: int = 5, blocks: int = 1) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, kind) of the test models, in state-dict order.

    kinds: ``weight`` (fan-in scaled), ``norm`` (LayerNorm weight, ~1),
    ``bias`` (~0), ``embed`` (~N(0, 1)), ``scalar`` (a 0-d float),
    ``ids`` (int64 position ids), ``mask`` (bool buffer).
    """
    spec: dict[str, tuple[tuple[int, ...], str]] = {
        "token_embedding.weight": ((vocab, d), "embed"),  # 2-D embedding: averaged by default
        "positional_embedding": ((ctx, d), "embed"),  # 2-D, no ".weight"
        "position_ids": ((1, ctx), "ids"),  # int64 buffer: copied
        "logit_scale": ((), "scalar"),  # 0-d float
    }
    for b in range(blocks):
        p = f"blocks.{b}."
        spec.update(
            {
                p + "ln_1.weight": ((d,), "norm"),
                p + "ln_1.bias": ((d,), "bias"),
                p + "attn.in_proj_weight": ((3 * d, d), "weight"),  # tall
                p + "attn.in_proj_bias": ((3 * d,), "bias"),
                p + "attn.out_proj.weight": ((d, d), "weight"),  # square
                p + "attn.out_proj.bias": ((d,), "bias"),
                p + "attn.gate.weight": ((1, d), "weight"),  # 1 x n
                p + "attn.rel_proj.weight": ((d, 3), "weight"),  # tall and thin: k = 1 < 3
                p + "attn.mask": ((ctx, ctx), "mask"),  # bool, 2-D, named "attn": still copied
                p + "ln_2.weight": ((d,), "norm"),
                p + "ln_2.bias": ((d,), "bias"),
                p + "mlp.c_fc.weight": ((4 * d, d), "weight"),  # tall
                p + "mlp.c_fc.bias": ((4 * d,), "bias"),
                p + "mlp.c_proj.weight": ((d, 4 * d), "weight"),  # wide
                p + "mlp.c_proj.bias": ((d,), "bias"),
            }
        )
    spec.update(
        {
            "ln_final.weight": ((d,), "norm"),
            "ln_final.bias": ((d,), "bias"),
            "head.weight": ((5, d), "weight"),  # 2-D, neither attn nor mlp
        }
    )
    return spec


#: Keys of ``make_models(blocks=1)`` that the DEFAULT filter must low-rank,
#: written out by hand: every floating 2-D tensor except embeddings.
EXPECTED_DEFAULT_LOW_RANK = {
    "blocks.0.attn.in_proj_weight",
    "blocks.0.attn.out_proj.weight",
    "blocks.0.attn.gate.weight",
    "blocks.0.attn.rel_proj.weight",
    "blocks.0.mlp.c_fc.weight",
    "blocks.0.mlp.c_proj.weight",
    "head.weight",
}
#: Keys of ``make_models(blocks=1)`` that the REFERENCE preset must low-rank:
#: "attn" or "mlp" in the name, neither "ln" nor "bias", 2-D floating.
EXPECTED_REFERENCE_LOW_RANK = EXPECTED_DEFAULT_LOW_RANK - {"head.weight"}


def _pretrained(shape: tuple[int, ...], kind: str, g: torch.Generator) -> Tensor:
    if kind == "weight":
        fan_in = shape[-1]
        return torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)
    if kind == "norm":
        return 1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "bias":
        return 0.02 * torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "embed":
        return torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "scalar":
        return torch.tensor(math.log(100.0), dtype=torch.float64) + 0.1 * torch.randn((), generator=g, dtype=torch.float64)
    raise AssertionError(kind)


def _task_delta(base: Tensor, kind: str, g: torch.Generator) -> Tensor:
    """A ~1e-2 relative task delta; for matrices an approximately low-rank one
    (rank-3 signal plus noise), as fine-tuning deltas are."""
    rms = float(base.pow(2).mean().sqrt()) if base.numel() else 1.0
    noise = torch.randn(base.shape, generator=g, dtype=torch.float64)
    if base.dim() == 2 and kind == "weight" and min(base.shape) > 3:
        m, n = base.shape
        signal = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
        noise = (signal / math.sqrt(3) + 0.5 * noise) / math.sqrt(1.25)
    return TASK_DELTA * rms * noise


def make_models(
    T: int = 3,
    d: int = 16,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    blocks: int = 1,
    spec: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
) -> list[dict[str, Tensor]]:
    """T random fine-tuned "models": shared pretrained weights + task deltas.

    Floating tensors are built in float64 and cast to ``dtype``; the int and
    bool buffers are the same in every model.
    """
    g = torch.Generator().manual_seed(seed)
    spec = model_spec(d, blocks=blocks) if spec is None else spec
    models: list[dict[str, Tensor]] = [{} for _ in range(T)]
    for name, (shape, kind) in spec.items():
        if kind == "ids":
            value = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
            for model in models:
                model[name] = value.clone()
            continue
        if kind == "mask":
            value = torch.ones(shape, dtype=torch.bool).tril()
            for model in models:
                model[name] = value.clone()
            continue
        base = _pretrained(shape, kind, g)
        for model in models:
            model[name] = (base + _task_delta(base, kind, g)).to(dtype)
    return models


def make_pretrained(d: int = 16, *, seed: int = 100, dtype: torch.dtype = torch.float32, blocks: int = 1) -> dict[str, Tensor]:
    """A compatible "pretrained" model (for the ``base=`` argument)."""
    return make_models(1, d, seed=seed, dtype=dtype, blocks=blocks)[0]


class TinyBlock(nn.Module):
    """An nn.Module whose state-dict keys are those of ``model_spec(d)``."""

    def __init__(self, d: int = 16, vocab: int = 11, ctx: int = 5) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx, d))
        self.register_buffer("position_ids", torch.zeros(1, ctx, dtype=torch.int64))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        block = nn.Module()
        block.ln_1 = nn.LayerNorm(d)
        block.attn = nn.MultiheadAttention(d, num_heads=2)  # in_proj_weight, in_proj_bias, out_proj.{weight,bias}
        block.attn.gate = nn.Linear(d, 1, bias=False)
        block.attn.rel_proj = nn.Linear(3, d, bias=False)
        block.attn.register_buffer("mask", torch.zeros(ctx, ctx, dtype=torch.bool))
        block.ln_2 = nn.LayerNorm(d)
        block.mlp = nn.Module()
        block.mlp.c_fc = nn.Linear(d, 4 * d)
        block.mlp.c_proj = nn.Linear(4 * d, d)
        self.blocks = nn.ModuleList([block])
        self.ln_final = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5, bias=False)


def as_module(state_dict: Mapping[str, Tensor], d: int = 16) -> TinyBlock:
    module = TinyBlock(d)
    assert set(module.state_dict()) == set(state_dict), set(module.state_dict()) ^ set(state_dict)
    module.load_state_dict(state_dict)
    return module


# ---------------------------------------------------------------------------
# The independent float64 reference
# ---------------------------------------------------------------------------

Selector = Callable[[str, Tensor], bool]


def reference_preset_selects(name: str, tensor: Tensor) -> bool:
    """The CART authors' filter: "attn" or "mlp" in the name, neither "ln" nor
    "bias" (plain substrings); only floating 2-D tensors can be low-ranked."""
    if not (tensor.dtype.is_floating_point and tensor.dim() == 2):
        return False
    return ("attn" in name or "mlp" in name) and "ln" not in name and "bias" not in name


def _is_ln_token(token: str) -> bool:
    return token == "ln" or (token.startswith("ln") and token[2:].isdigit())


def default_selects(name: str, tensor: Tensor) -> bool:
    """The documented default: every floating 2-D tensor except embeddings
    (``embed``, GPT-2/T5 ``wte``/``wpe``/``shared`` tables, T5's
    ``relative_attention_bias``, ``position``, class tokens), output heads tied
    to them (``lm_head``) and norms (``norm``, ``ln_1``/``ln_f``/``.ln.``).
    Written with string operations, not regexes."""
    if not (tensor.dtype.is_floating_point and tensor.dim() == 2):
        return False
    lowered_words = ("embed", "lm_head", "norm", "position", "cls_token", "class_embedding", "relative_attention_bias")
    if any(word in name for word in lowered_words):
        return False
    parts = name.split(".")
    if any(part in ("wte", "wpe", "shared") for part in parts[:-1]):
        return False
    tokens = [tok for part in parts for tok in part.split("_")]
    # "ln" must start a dotted part or follow "_" (as in "ln_1", "x_ln1").
    return not any(_is_ln_token(tok) for tok in tokens)


def reference_rank(m: int, n: int, rank_ratio: float, rank: int | None) -> int:
    if rank is not None:
        return min(rank, m, n)
    return max(1, math.floor(rank_ratio * min(m, n)))


def reference_truncated(A: Tensor, k: int) -> Tensor:
    """SVD_k(A) in float64 with a dense SVD."""
    U, S, Vh = torch.linalg.svd(A.to(torch.float64), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k, :]


def reference_layer(matrices: Sequence[Tensor], k: int, scale: float) -> Tensor:
    """θ_avg + λ Σ_t SVD_k(θ_t − θ_avg) for one layer, in float64."""
    X = [t.to(torch.float64) for t in matrices]
    average = sum(X) / len(X)
    low_rank_sum = torch.zeros_like(average)
    for x in X:
        low_rank_sum += reference_truncated(x - average, k)
    return average + scale * low_rank_sum


def reference_cart(
    models: Sequence[Mapping[str, Tensor]],
    *,
    select: Selector = default_selects,
    rank_ratio: float = 0.08,
    rank: int | None = None,
    scale: float = 2.0,
    ranks: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """CART in float64. Floating results are float64; others are copies.

    ``ranks`` (name -> k) overrides the rank rule for the names it lists.
    """
    result: dict[str, Tensor] = {}
    for name, first in models[0].items():
        tensors = [model[name] for model in models]
        if not first.dtype.is_floating_point:
            assert all(torch.equal(t, first) for t in tensors)
            result[name] = first.clone()
            continue
        if select(name, first):
            m, n = first.shape
            k = ranks[name] if ranks and name in ranks else reference_rank(m, n, rank_ratio, rank)
            result[name] = reference_layer(tensors, k, scale)
        else:
            result[name] = sum(t.to(torch.float64) for t in tensors) / len(tensors)
    return result


def reference_low_rank_keys(models: Sequence[Mapping[str, Tensor]], select: Selector) -> set[str]:
    return {name for name, tensor in models[0].items() if select(name, tensor)}


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------


def relative_error(got: Tensor, expected: Tensor) -> float:
    """‖got − expected‖_F / ‖expected‖_F in float64 (absolute if expected is 0)."""
    diff = (got.to(torch.float64) - expected.to(torch.float64)).norm().item()
    norm = expected.to(torch.float64).norm().item()
    return diff / norm if norm > 0 else diff


def assert_matches_reference(
    result: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    rtol: float,
    dtypes: Mapping[str, torch.dtype],
) -> None:
    """Same keys, shapes, dtypes; floating values within ``rtol`` (Frobenius,
    relative to the tensor's norm); non-floating values equal."""
    assert set(result) == set(reference), set(result) ^ set(reference)
    for name, expected in reference.items():
        got = result[name]
        assert isinstance(got, Tensor), name
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        assert got.dtype == dtypes[name], (name, got.dtype, dtypes[name])
        if expected.dtype.is_floating_point:
            err = relative_error(got, expected)
            assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"
        else:
            assert torch.equal(got, expected), name


def input_dtypes(model: Mapping[str, Tensor], out_dtype: torch.dtype | None = None) -> dict[str, torch.dtype]:
    """Expected output dtypes: ``out_dtype`` for floating tensors, else the input's."""
    return {
        name: (out_dtype if (out_dtype is not None and t.dtype.is_floating_point) else t.dtype)
        for name, t in model.items()
    }


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture
def forbid_decomposition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any decomposition fail the test: proves a check ran before it."""
    import lowrank_merge._ops as ops

    def fail(*args, **kwargs):
        pytest.fail("a decomposition started before the input was rejected")

    monkeypatch.setattr(ops, "centered_low_rank_sum", fail)
    monkeypatch.setattr(ops, "low_rank_factors", fail)


# ---------------------------------------------------------------------------
# Orthonormal bases (CholeskyQR2 tests, CUDA tests)
# ---------------------------------------------------------------------------


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``[rows, cols]`` float64 with orthonormal columns (Q of a Gaussian matrix)."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64)).Q


def orthogonality_error(Q: torch.Tensor) -> float:
    Q = Q.to(torch.float64)
    eye = torch.eye(Q.shape[-1], dtype=torch.float64, device=Q.device)
    return (Q.mT @ Q - eye).abs().max().item()


def span_error(Q: torch.Tensor, Y: torch.Tensor) -> float:
    """``‖Y − Q Qᵀ Y‖_F / ‖Y‖_F`` in float64."""
    Q, Y = Q.to(torch.float64), Y.to(torch.float64)
    return ((Y - Q @ (Q.mT @ Y)).norm() / Y.norm()).item()


def conditioned(batch: int, m: int, p: int, cond: float, seed: int) -> torch.Tensor:
    """``[batch, m, p]`` float64 with singular values log-spaced from 1 to 1/cond."""
    generator = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -math.log10(cond), p, dtype=torch.float64)
    return torch.stack([(random_orthonormal(m, p, generator) * spectrum) @ random_orthonormal(p, p, generator).T for _ in range(batch)])
