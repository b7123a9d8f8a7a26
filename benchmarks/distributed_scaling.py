"""Scaling of the distributed merge from 1 to N processes on this machine (issue 8).

Builds T synthetic sharded checkpoints (LAYERS square DIM x DIM weights plus
biases and norms each, like ``streaming_memory.py``), then merges them with the
CLI three ways and checks that the distributed output is bit-identical to the
single-process one at the same number of BLAS threads per process:

* one process, ``--threads`` torch threads (all the cores);
* ``torchrun --nproc-per-node N ... --distributed``, one thread per process
  (gloo on the CPU);
* one process with one thread (what each rank has).

It prints the wall times (process start to exit, so the distributed row pays
for the process group and N interpreters) and the merge's own time from the
summary line, the speed-up, and the plan's balance from ``inspect --plan N``.
Page cache warm (every file read once before).

Usage::

    python benchmarks/distributed_scaling.py --out benchmarks/results/distributed_scaling_cpu_<date>.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from streaming_memory import build_models  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], threads: int) -> tuple[float, float, str]:
    """(wall seconds, the merge's own seconds from its summary line, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    match = re.search(r"in ([0-9.]+) s \(", done.stderr)
    return wall, float(match.group(1)) if match else float("nan"), done.stderr


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    merged = {}
    for file in sorted(folder.glob("*.safetensors")):
        merged.update(load_file(str(file)))
    return merged


def _same_output(a: Path, b: Path) -> bool:
    left, right = _state(a), _state(b)
    return left.keys() == right.keys() and all(left[name].equal(right[name]) for name in left)


def _max_difference(a: Path, b: Path) -> float:
    """The largest ‖x − y‖ / ‖y‖ over the tensors of two outputs."""
    left, right = _state(a), _state(b)
    return max(((left[name].double() - right[name].double()).norm() / right[name].double().norm().clamp_min(1e-300)).item()
               for name in right)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--rank-ratio", type=float, default=0.08)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()

    merge = [sys.executable, "-m", "lowrank_merge", "merge"]
    options = ["--rank-ratio", str(args.rank_ratio)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = [str(path) for path in build_models(tmp, args.models, args.layers, args.dim, 2, "float32")]
        for path in paths:  # warm the page cache
            for file in Path(path).glob("*.safetensors"):
                file.read_bytes()
        plan = subprocess.run(
            [sys.executable, "-m", "lowrank_merge", "inspect", *paths, *options, "--plan", str(args.processes)],
            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        ).stdout
        balance = next((line for line in plan.splitlines() if line.startswith("balance:")), "balance: n/a")
        single = tmp / "single"
        rows.append(("1 process", args.threads, *_run([*merge, *paths, "--out", str(single), *options], args.threads)[:2]))
        one_thread = tmp / "one-thread"
        rows.append(("1 process", 1, *_run([*merge, *paths, "--out", str(one_thread), *options], 1)[:2]))
        distributed = tmp / "distributed"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes),
                    "--master-port", str(_free_port())]
        rows.append((f"torchrun, {args.processes} processes (gloo)", 1,
                     *_run([*launcher, "-m", "lowrank_merge", "merge", *paths, "--out", str(distributed), *options,
                            "--distributed"], 1)[:2]))
        # Bitwise equality holds at equal BLAS threads per process: MKL/OpenBLAS
        # sum in another order with 2 threads than with 1.
        identical = _same_output(one_thread, distributed)
        threads_differ = _max_difference(single, one_thread)

    import torch

    base_wall = rows[0][2]
    lines = [
        "# Distributed merge: scaling from 1 to N processes",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')} · {platform.processor() or platform.machine()} · "
        f"{os.cpu_count()} logical CPUs · torch {torch.__version__} · python {platform.python_version()}",
        "",
        f"{args.models} checkpoints of {args.layers} x {args.dim}² float32 (+ biases, norms), CART at rank ratio "
        f"{args.rank_ratio} (default engine), page cache warm. Wall: process start to exit; merge: the "
        "merge's own time from its summary line (rank 0's share for torchrun).",
        "",
        "| run | threads per process | wall | merge | wall speed-up vs 1 process |",
        "|---|---|---|---|---|",
    ]
    for name, threads, wall, merge_seconds in rows:
        lines.append(f"| {name} | {threads} | {wall:.2f} s | {merge_seconds:.2f} s | {base_wall / wall:.2f}x |")
    lines += [
        "",
        f"plan ({args.processes} ranks): {balance}",
        f"torchrun output bit-identical to the 1-process, 1-thread merge: {identical}",
        f"1 process with {args.threads} threads against 1 thread: largest relative difference of a tensor "
        f"{threads_differ:.1e} (the BLAS sums in another order with more threads)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
