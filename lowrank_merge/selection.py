"""Which tensors get the low-rank treatment, and with which rank.

A tensor is *low-ranked* when it is floating point, 2-D, its name matches one
pattern of ``include`` and no pattern of ``exclude`` (Python regular
expressions, ``re.search`` on the full name). Every other floating tensor is
averaged; non-floating tensors are copied.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

#: Names excluded by default: token/position embeddings, output heads tied to
#: them, and normalisation weights. Embedding rows are looked up, not
#: multiplied, so a low-rank model of their task vectors has no meaning, and
#: norms are 1-D in most models but 2-D in some (e.g. stacked norm tables).
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"embed",  # embeddings, embed_tokens, token_embedding, patch_embed, ...
    r"(^|\.)(wte|wpe|shared)\.",  # GPT-2 and T5 embedding tables
    r"relative_attention_bias",  # T5's relative position bias: a lookup table too
    r"lm_head",
    r"norm",  # LayerNorm, RMSNorm, layernorm, norm1, ...
    r"(^|[._])ln(_|\d|\.|$)",  # open_clip / GPT-2 style ln_1, ln_f, .ln.
    r"position",
    r"cls_token|class_embedding",
)

#: The CART reference code's filter: names containing "attn" or "mlp" and
#: neither "ln" nor "bias" (plain substrings, as in the authors' merging.py).
REFERENCE_INCLUDE: tuple[str, ...] = (r"attn", r"mlp")
REFERENCE_EXCLUDE: tuple[str, ...] = (r"ln", r"bias")

KEY_PRESETS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "default": {"include": None, "exclude": DEFAULT_EXCLUDE},
    "reference": {"include": REFERENCE_INCLUDE, "exclude": REFERENCE_EXCLUDE},
    "all": {"include": None, "exclude": ()},
}


def key_preset(name: str) -> dict[str, tuple[str, ...] | None]:
    """``include``/``exclude`` keyword arguments of a named preset.

    ``cart_merge(models, **key_preset("reference"))`` reproduces the reference
    code's key filter. Presets: ``default``, ``reference``, ``all``.
    """
    if name not in KEY_PRESETS:
        raise ValueError(f"unknown key preset {name!r}; choose one of {sorted(KEY_PRESETS)}")
    return dict(KEY_PRESETS[name])


def _compile_patterns(patterns: str | Iterable[str] | None, argument: str) -> tuple[re.Pattern[str], ...] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = (patterns,)
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{argument} patterns must be strings, got {type(pattern).__name__}")
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"{argument} pattern {pattern!r} is not a valid regular expression: {error}") from None
    return tuple(compiled)


@dataclass(frozen=True)
class KeyFilter:
    """Compiled ``include``/``exclude`` patterns (``None`` include = every name)."""

    include: tuple[re.Pattern[str], ...] | None
    exclude: tuple[re.Pattern[str], ...]

    @classmethod
    def build(cls, include: str | Iterable[str] | None, exclude: str | Iterable[str] | None) -> "KeyFilter":
        """``exclude=None`` means :data:`DEFAULT_EXCLUDE`; pass ``()`` to exclude nothing."""
        if exclude is None:
            exclude = DEFAULT_EXCLUDE
        return cls(_compile_patterns(include, "include"), _compile_patterns(exclude, "exclude") or ())

    def matches(self, name: str) -> bool:
        included = self.include is None or any(p.search(name) for p in self.include)
        return included and not any(p.search(name) for p in self.exclude)

    def is_low_rank(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
        return dtype.is_floating_point and len(shape) == 2 and self.matches(name)


def rank_for(shape: Sequence[int], rank_ratio: float, rank: int | None) -> int:
    """The kept rank k of an ``m x n`` matrix.

    ``k = max(1, floor(rank_ratio * min(m, n)))``, the CART paper's rule (the
    max(1, ·) keeps thin matrices such as ``1 x n`` at rank 1); a fixed
    ``rank`` overrides it and is clipped to ``min(m, n)``.
    """
    full = min(shape)
    if rank is not None:
        return min(rank, full)
    return max(1, math.floor(rank_ratio * full))
