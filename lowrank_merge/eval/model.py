"""A small vision transformer with open_clip's parameter names.

The names (``transformer.resblocks.{i}.attn.in_proj_weight``,
``...attn.out_proj.weight``, ``...mlp.c_fc.weight``, ``...mlp.c_proj.weight``,
``ln_1`` / ``ln_2``) match CLIP's ViTs, so the reference key filter (keys
with "attn" or "mlp", without "ln" or "bias") selects the same kinds of
matrices as in the paper.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 16
    patch_size: int = 4
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, width * mlp_ratio),
                gelu=nn.GELU(),
                c_proj=nn.Linear(width * mlp_ratio, width),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(
            *(ResidualBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """Images ``[B, 1, S, S]`` -> features ``[B, width]`` (the class token after ``ln_post``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Linear(config.patch_size**2, config.width)
        self.class_embedding = nn.Parameter(torch.randn(config.width) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(patches + 1, config.width) * 0.02)
        self.ln_pre = nn.LayerNorm(config.width)
        self.transformer = Transformer(config)
        self.ln_post = nn.LayerNorm(config.width)

    def forward(self, images: Tensor) -> Tensor:
        p = self.config.patch_size
        patches = images.unfold(2, p, p).unfold(3, p, p).reshape(images.shape[0], -1, p * p)
        tokens = self.patch_embed((patches - 0.5) * 2.0)
        cls = self.class_embedding.expand(tokens.shape[0], 1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0])
