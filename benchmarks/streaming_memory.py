"""Peak resident memory of a streaming merge against its bound (not a test).

For each ``LAYERSxDIM`` in ``--shapes``, builds T synthetic sharded Hugging
Face checkpoints (LAYERS square DIM x DIM weights plus biases and norms each) in
a temporary folder, runs ``python -m lowrank_merge merge`` on them in a
subprocess and reports its peak RSS (``wait4`` rusage, measured through a small
launcher so that the parent's RSS is not inherited) next to:

* the baseline: the peak RSS of ``python -c "import torch, lowrank_merge"``;
* the warm baseline: the same CLI merging tiny models (``--warm-shape``), which
  adds the code pages of the linear algebra and the I/O libraries;
* the bound ``warm baseline + T x (largest tensor) x C`` with ``C = --constant``;
* the throughput (input bytes read per second of merging, after the checks);
* with ``--compare``, the first shape loaded whole and merged in memory with
  ``cart_merge``, as the CART reference code does.

The default shapes keep the largest tensor fixed while doubling the model
(24x1024 -> 48x1024: the peak should not move) and keep the model size while
quadrupling the largest tensor (24x1024 -> 6x2048: the peak should grow).

Usage::

    python benchmarks/streaming_memory.py --threads 1 --compare \
        --out benchmarks/results/streaming_memory_cpu.txt
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20


def build_models(root: Path, models: int, layers: int, dim: int, shards: int, dtype_name: str) -> list[Path]:
    """T sharded checkpoints: a shared random "pretrained" model plus a small
    low-rank-ish delta per model, written shard by shard (never a whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    names = []
    for layer in range(layers):
        names += [f"model.layers.{layer}.mlp.weight", f"model.layers.{layer}.mlp.bias", f"model.layers.{layer}.norm.weight"]
    per_shard = -(-len(names) // shards)
    parts = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    paths = []
    for index in range(models):
        folder = root / f"model_{index}"
        folder.mkdir()
        weight_map = {}
        for shard_index, part in enumerate(parts, start=1):
            file = f"model-{shard_index:05d}-of-{len(parts):05d}.safetensors"
            tensors = {}
            for name in part:
                layer = int(name.split(".")[2])
                base = torch.Generator().manual_seed(layer)  # the same pretrained weight in every model
                task = torch.Generator().manual_seed(1000 * (index + 1) + layer)
                if name.endswith("mlp.weight"):
                    weight = torch.randn(dim, dim, generator=base) / dim**0.5
                    u = torch.randn(dim, 8, generator=task)
                    v = torch.randn(8, dim, generator=task)
                    weight += 1e-3 * (u @ v) + 1e-4 * torch.randn(dim, dim, generator=task)
                elif name.endswith("norm.weight"):
                    weight = 1 + 0.01 * torch.randn(dim, generator=task)
                else:
                    weight = 0.01 * torch.randn(dim, generator=task)
                tensors[name] = weight.to(dtype)
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in part})
            del tensors
        index_file = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_file))
        (folder / "config.json").write_text(json.dumps({"model_type": "synthetic", "torch_dtype": dtype_name}))
        paths.append(folder)
    return paths


#: Runs a command and reports its peak RSS. It is started as a small separate
#: Python (no torch) because a child's ru_maxrss starts from its parent's RSS at
#: fork/exec: measured straight from this script, every child would inherit
#: this process's (torch-sized) RSS.
LAUNCHER = r"""
import json, os, subprocess, sys, tempfile, threading, time
report, command = sys.argv[1], sys.argv[2:]
out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
started = time.perf_counter()
process = subprocess.Popen(command, stdout=out, stderr=err)
peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
done = threading.Event()

def poll():
    while not done.is_set():
        try:
            with open(f"/proc/{process.pid}/status") as handle:
                for line in handle:
                    key, _, rest = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(rest.split()[0]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.005)

poller = threading.Thread(target=poll, daemon=True)
poller.start()
_, status, usage = os.wait4(process.pid, 0)
wall = time.perf_counter() - started
done.set()
poller.join()
process.returncode = os.waitstatus_to_exitcode(status)
out.seek(0)
err.seek(0)
result = {"maxrss": usage.ru_maxrss * 1024, "peaks": peaks, "wall": wall, "returncode": process.returncode,
          "stdout": out.read(), "stderr": err.read()}
with open(report, "w") as handle:
    json.dump(result, handle)
"""


def run_measured(command: list[str], env: dict[str, str]) -> dict[str, object]:
    """Run ``command`` under :data:`LAUNCHER`; its peak RSS, polled peaks, wall time and output."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done = subprocess.run([sys.executable, "-c", LAUNCHER, str(report), *command], env=env, capture_output=True, text=True)
        if done.returncode != 0 or not report.exists():
            raise SystemExit(f"launcher failed: {done.stderr}")
        result = json.loads(report.read_text())
    if result["returncode"] != 0:
        raise SystemExit(f"command failed ({result['returncode']}): {' '.join(command)}\n{result['stderr']}")
    return result


COMPARE = """
import sys, time, torch, lowrank_merge
from lowrank_merge.checkpoints import open_checkpoint
started = time.perf_counter()
models = []
for path in sys.argv[1:]:
    reader = open_checkpoint(path)
    models.append({name: reader.read(name).clone() for name in reader.names()})
merged = lowrank_merge.cart_merge(models)
print(f"in-memory cart_merge: {time.perf_counter() - started:.2f} s")
"""


def _merge_run(paths: list[Path], out: Path, env: dict[str, str]) -> dict[str, object]:
    result = run_measured([sys.executable, "-m", "lowrank_merge", "merge", *map(str, paths), "--out", str(out)], env)
    match = re.search(r"in ([0-9.]+) s \(", result["stderr"])
    result["merge_seconds"] = float(match.group(1)) if match else float("nan")
    result["written"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument(
        "--shapes",
        default="24x1024,48x1024,6x2048",
        help="comma-separated LAYERSxDIM model shapes to measure (default: %(default)s)",
    )
    parser.add_argument("--warm-shape", default="24x64", help="tiny models whose merge gives the warm baseline")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--constant", type=float, default=6.0, help="C of the bound: warm baseline + T x largest x C")
    parser.add_argument("--compare", action="store_true", help="also measure the in-memory cart_merge (first shape)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the measured processes (default: torch's)")
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--workdir", type=Path, help="where to build the models (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    T = args.models
    lines = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    def shape(text: str) -> tuple[int, int]:
        layers, dim = text.lower().split("x")
        return int(layers), int(dim)

    say(f"# streaming merge memory benchmark ({args.date}, {args.machine})")
    say(f"# python {platform.python_version()}, torch {torch.__version__}, {args.threads or torch.get_num_threads()} thread(s)")
    say(
        f"# command: python benchmarks/streaming_memory.py --models {T} --shapes {args.shapes} --shards {args.shards} "
        f"--dtype {args.dtype} --constant {args.constant:g}"
        + (f" --threads {args.threads}" if args.threads is not None else "")
        + (" --compare" if args.compare else "")
    )
    say(f"# T = {T} synthetic sharded checkpoints per row (LAYERS square DIMxDIM {args.dtype} weights + biases + norms),")
    say("# merged by `python -m lowrank_merge merge` in a subprocess; peak RSS from wait4() of that process.")
    say(f"# load average when started: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (timings are only as quiet as the machine)")
    say()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        baseline = run_measured([sys.executable, "-c", "import torch, lowrank_merge"], env)
        warm_layers, warm_dim = shape(args.warm_shape)
        (tmp / "warm").mkdir()
        warm_paths = build_models(tmp / "warm", T, warm_layers, warm_dim, 1, args.dtype)
        warm = _merge_run(warm_paths, tmp / "warm" / "merged", env)
        label_a = "baseline: python -c 'import torch, lowrank_merge'"
        label_b = f"warm baseline: the CLI merging {T} tiny {args.warm_shape} models"
        width = max(len(label_a), len(label_b))
        say(f"{label_a:<{width}}  {baseline['maxrss'] / MiB:7.1f} MiB")
        say(f"{label_b:<{width}}  {warm['maxrss'] / MiB:7.1f} MiB  (adds the code pages of the linear algebra and I/O libraries)")
        say(f"bound: warm baseline + T x largest tensor x C, C = {args.constant:g}")
        say()
        header = ("layers x dim", "MiB/model", "total MiB", "T x largest", "bound MiB", "peak RSS", "above base",
                  "/(T x largest)", "above warm", "/(T x largest)", "merge s", "MiB/s read")
        rows = [header]
        first_paths = None
        for text in args.shapes.split(","):
            layers, dim = shape(text)
            folder = tmp / text
            folder.mkdir()
            paths = build_models(folder, T, layers, dim, args.shards, args.dtype)
            first_paths = first_paths or paths
            largest = dim * dim * element
            model_bytes = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
            total = model_bytes * T
            result = _merge_run(paths, folder / "merged", env)
            bound = warm["maxrss"] + T * largest * args.constant
            peak = result["maxrss"]
            rows.append(
                (
                    text,
                    f"{model_bytes / MiB:.1f}",
                    f"{total / MiB:.1f}",
                    f"{T * largest / MiB:.1f}",
                    f"{bound / MiB:.1f}",
                    f"{peak / MiB:.1f}" + ("" if peak <= bound else " OVER"),
                    f"{(peak - baseline['maxrss']) / MiB:.1f}",
                    f"{(peak - baseline['maxrss']) / (T * largest):.2f}",
                    f"{(peak - warm['maxrss']) / MiB:.1f}",
                    f"{(peak - warm['maxrss']) / (T * largest):.2f}",
                    f"{result['merge_seconds']:.1f}",
                    f"{total / MiB / result['merge_seconds']:.1f}",
                )
            )
            print("  measured", text, f"{peak / MiB:.1f} MiB", flush=True)
            if not args.compare:
                for path in paths:
                    shutil.rmtree(path)
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            say("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if args.compare and first_paths is not None:
            compared = run_measured([sys.executable, "-c", COMPARE, *map(str, first_paths)], env)
            say()
            say(
                f"for comparison, {args.shapes.split(',')[0]} loaded whole and merged in memory with cart_merge: "
                f"{compared['maxrss'] / MiB:.1f} MiB peak RSS, {compared['stdout'].strip().split(': ')[-1]}"
            )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
