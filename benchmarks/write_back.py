"""The output writer's early write-back, on and off (benchmarks/NOTES.md,
2026-12-03, sixth session).

    python benchmarks/write_back.py [--gib 2] [--work-ms 20] [--rounds 2]

Writes one ``--gib`` GiB safetensors shard through ``ShardedWriter`` in 16 MiB
tensors, with ``--work-ms`` of busy CPU before each (the merge of the next
tensor), with the write-back of each written chunk started at once
(``sync_file_range``, the default on Linux) and without it (the kernel then
writes most of the shard during the fsync that closes it). Prints the total
time and that of the last write, which closes the shard.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import lowrank_merge.checkpoints as checkpoints
from lowrank_merge.checkpoints import ShardedWriter, TensorSpec


def busy(seconds: float) -> None:
    """Keep one CPU busy, as merging the next tensor would."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def write_shard(folder: Path, tensor: torch.Tensor, count: int, work_seconds: float) -> tuple[float, float]:
    """(total seconds, seconds of the last write) for ``count`` copies of ``tensor``."""
    specs = [TensorSpec(f"t{i}", tuple(tensor.shape), tensor.dtype) for i in range(count)]
    start = time.perf_counter()
    with ShardedWriter(folder / "out.safetensors", specs) as writer:
        writer.start()
        for spec in specs:
            busy(work_seconds)
            before = time.perf_counter()
            writer.write(spec.name, tensor)
        last = time.perf_counter() - before
        writer.commit()
    return time.perf_counter() - start, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--work-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if checkpoints._start_writeback is None:
        raise SystemExit("no sync_file_range here (not Linux): nothing to compare")
    tensor = torch.randn(4096, 1024)  # 16 MiB
    count = max(1, round(args.gib * 2**30 / (tensor.numel() * 4)))
    starter = checkpoints._start_writeback
    print(f"{count} tensors of 16 MiB, {args.work_ms:.0f} ms of work before each ({count * args.work_ms / 1e3:.2f} s)")
    for _ in range(args.rounds):
        for write_back in (True, False):
            checkpoints._start_writeback = starter if write_back else None
            with tempfile.TemporaryDirectory() as tmp:
                total, last = write_shard(Path(tmp), tensor, count, args.work_ms / 1e3)
            print(f"write-back {'on ' if write_back else 'off'}: total {total:.2f} s, last write (closes the shard) {last:.2f} s")
    checkpoints._start_writeback = starter


if __name__ == "__main__":
    main()
