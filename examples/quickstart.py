"""Merge T generated ViT-like models with CART and compare the engines.

Builds a "pretrained" ViT-shaped state dict and T fine-tuned copies (shared
weights plus small low-rank-ish task deltas, ~1 % of the weights), merges
them with every engine and reports the time and the distance of each merge to
the exact (dense SVD) merge, relative to the size of the merged task vector.

Usage: python examples/quickstart.py [--tasks 8] [--width 384] [--blocks 4]
"""

from __future__ import annotations

import argparse
import time

import torch

import lowrank_merge as lm


def vit_like(width: int, blocks: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """An open_clip-style ViT state dict (attention, MLP, norms, embeddings)."""
    state = {
        "conv1.weight": torch.randn(width, 3 * 16 * 16, generator=generator) * 0.02,
        "positional_embedding": torch.randn(50, width, generator=generator) * 0.02,
        "ln_post.weight": torch.ones(width),
    }
    for b in range(blocks):
        prefix = f"transformer.resblocks.{b}"
        state |= {
            f"{prefix}.ln_1.weight": torch.ones(width),
            f"{prefix}.attn.in_proj_weight": torch.randn(3 * width, width, generator=generator) * width**-0.5,
            f"{prefix}.attn.in_proj_bias": torch.zeros(3 * width),
            f"{prefix}.attn.out_proj.weight": torch.randn(width, width, generator=generator) * width**-0.5,
            f"{prefix}.mlp.c_fc.weight": torch.randn(4 * width, width, generator=generator) * width**-0.5,
            f"{prefix}.mlp.c_proj.weight": torch.randn(width, 4 * width, generator=generator) * (4 * width) ** -0.5,
        }
    return state


def fine_tune(pretrained: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A task model: each weight moves by a delta with a decaying spectrum."""
    tuned = {}
    for name, weight in pretrained.items():
        if weight.dim() == 2:
            m, n = weight.shape
            r = min(m, n)
            left = torch.randn(m, r, generator=generator) / m**0.5
            right = torch.randn(r, n, generator=generator) / n**0.5
            spectrum = torch.arange(1, r + 1, dtype=torch.float32) ** -0.8
            delta = (left * spectrum) @ right
            tuned[name] = weight + 0.01 * weight.norm() / delta.norm() * delta
        else:
            tuned[name] = weight + 1e-3 * torch.randn(weight.shape, generator=generator)
    return tuned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--rank-ratio", type=float, default=0.08)
    parser.add_argument("--scale", type=float, default=2.0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    pretrained = vit_like(args.width, args.blocks, generator)
    models = [fine_tune(pretrained, generator) for _ in range(args.tasks)]
    print(f"C++ extension: {'loaded' if lm.extension_available() else 'not available (pure torch)'}")
    print(f"{args.tasks} models, {sum(t.numel() for t in pretrained.values()) / 1e6:.1f} M parameters each; "
          f"rank_ratio={args.rank_ratio}, scale={args.scale}\n")

    average = {name: torch.stack([m[name] for m in models]).mean(0) for name in pretrained}
    results = {}
    for engine in ("exact", "gram", "krylov", "randomized"):
        start = time.perf_counter()
        results[engine] = lm.cart_merge(models, rank_ratio=args.rank_ratio, scale=args.scale, svd=engine, base=pretrained)
        results[engine + "_seconds"] = time.perf_counter() - start

    exact = results["exact"]
    moved = sum((exact[n] - average[n]).norm() ** 2 for n in exact) ** 0.5
    print(f"{'engine':<12}{'seconds':>10}{'‖merge − exact merge‖ / ‖exact merge − average‖':>52}")
    for engine in ("exact", "gram", "krylov", "randomized"):
        merged = results[engine]
        distance = sum((merged[n] - exact[n]).norm() ** 2 for n in exact) ** 0.5
        print(f"{engine:<12}{results[engine + '_seconds']:>10.2f}{float(distance / moved):>52.2e}")

    identity = lm.cart_merge(models, rank_ratio=1.0)
    gap = max(float((identity[n] - average[n]).abs().max()) for n in average)
    print(f"\nrank_ratio=1 gives the average: max |difference| = {gap:.1e}")


if __name__ == "__main__":
    main()
