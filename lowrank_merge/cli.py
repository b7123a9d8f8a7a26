"""The ``lowrank-merge`` command line (also ``python -m lowrank_merge``).

::

    lowrank-merge merge MODEL_1 ... MODEL_T --out DIR [--method NAME] [options]
    lowrank-merge merge --config merge.yaml DIR [options]
    lowrank-merge inspect MODEL_1 ... MODEL_T [--method NAME] [options]

Every method of :data:`lowrank_merge.METHODS` runs through the same streaming
merge; a parameter the chosen method does not take is an error.

Errors are one line on stderr and a non-zero exit status (1; 2 for usage
errors, 130 when interrupted); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .checkpoints import DEFAULT_MAX_SHARD_SIZE, format_size, one_line, parse_size
from .config import COMPUTE_DTYPES, OUT_DTYPES, MergeConfig, dtype_name, load_config, method_parameters
from .methods import METHODS, TRIM_CHOICES, MethodSpec
from .selection import KEY_PRESETS
from .validation import SVD_CHOICES
from .eval.demo import add_demo_arguments, run_demo

if TYPE_CHECKING:
    import torch

PROG = "lowrank-merge"


class UsageError(ValueError):
    """Arguments that parse but do not make sense together."""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _takers(parameter: str) -> str:
    """The methods that take ``parameter``, for the help texts."""
    return ", ".join(name for name, spec in METHODS.items() if parameter in spec.accepted)


def _defaults(parameter: str) -> str:
    """``cart 2, ties 1, ...``: each method's default of ``parameter``, for the help texts."""
    return ", ".join(
        f"{name} {spec.parameters[parameter]:g}"
        for name, spec in METHODS.items()
        if spec.parameters.get(parameter) is not None
    )


def _settings_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("merge parameters (override --config; each method takes only its own)")
    group.add_argument("--method", choices=list(METHODS), help="merge method (default: the config's merge_method, else cart)")
    ranks = group.add_mutually_exclusive_group()
    ranks.add_argument("--rank-ratio", type=float, metavar="R", help=f"[{_takers('rank_ratio')}] kept rank k = max(1, floor(R * min(m, n))); default: {_defaults('rank_ratio')}, tsv floor(min(m, n) / T)")
    ranks.add_argument("--rank", type=int, metavar="K", help=f"[{_takers('rank')}] a fixed rank k for every decomposed matrix (clipped to min(m, n))")
    group.add_argument("--scale", type=float, metavar="L", help=f"[{_takers('scale')}] λ, the factor on the merged task vector; default: {_defaults('scale')}")
    group.add_argument("--density", type=float, metavar="D", help=f"[{_takers('density')}] fraction of each task vector's entries kept (largest magnitudes); default {_defaults('density')}")
    group.add_argument("--trim", choices=TRIM_CHOICES, help=f"[{_takers('trim')}] keep the largest entries per tensor, or over the whole model (default model: a pre-pass reads the models 2 more times, 4 with --dtype float64)")
    group.add_argument("--common-fraction", type=float, metavar="F", help=f"[{_takers('common_fraction')}] share of the rank kept for the common subspace; default {_defaults('common_fraction')}")
    group.add_argument("--preset", choices=sorted(KEY_PRESETS), help=f"[{_takers('include')}] named include/exclude filter (default: default)")
    group.add_argument("--include", nargs="+", action="extend", metavar="RE", help=f"[{_takers('include')}] only decompose 2-D tensors whose name matches one of these regexes")
    group.add_argument("--exclude", nargs="+", action="extend", metavar="RE", help=f"[{_takers('exclude')}] never decompose tensors matching these regexes (replaces the preset's)")
    group.add_argument("--svd", choices=SVD_CHOICES, help=f"[{_takers('svd')}] top-k SVD engine (default auto: per layer the cheaper of gram_subspace and chebyshev)")
    group.add_argument("--niter", type=int, metavar="N", help=f"[{_takers('niter')}] iterations of the sketch engines (default 2 randomized/krylov, 3 gram_subspace, 4 chebyshev; auto: that of the engine it picks)")
    group.add_argument("--oversample", type=int, metavar="P", help=f"[{_takers('oversample')}] extra sketch columns (default 10 randomized, 0 krylov, max(10, k/2) gram_subspace/chebyshev/auto)")
    group.add_argument("--seed", type=int, metavar="N", help=f"[{_takers('seed')}] seed of the Gaussian sketch (default 0)")
    group.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), help="compute dtype (default float32)")
    group.add_argument("--out-dtype", choices=sorted(OUT_DTYPES), help="dtype of floating outputs (default: the input's)")
    needs = ", ".join(name for name, spec in METHODS.items() if spec.needs_base)
    checks = ", ".join(name for name, spec in METHODS.items() if not spec.needs_base)
    parser.add_argument("--base", metavar="PATH", help=f"the pretrained model: required by {needs}; only checked for compatibility by {checks}")
    parser.add_argument("--config", metavar="YAML", help="a merge config (merge_method, models, base_model, parameters)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks with errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Merge fine-tuned models with CART or a baseline method, streaming checkpoints from disk one tensor at a time.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{merge,inspect,demo}")
    commands.required = True

    merge = commands.add_parser(
        "merge",
        help="merge models into an output folder",
        description="Merge MODEL_1 ... MODEL_T into --out, or the models of --config into DIR.",
        usage=f"{PROG} merge MODEL_1 ... MODEL_T --out DIR [options]\n       {PROG} merge --config merge.yaml DIR [options]",
    )
    merge.add_argument("inputs", nargs="*", metavar="MODEL", help="model folders or weight files (with --config: the output DIR)")
    merge.add_argument("-o", "--out", metavar="DIR", help="output folder (or a .safetensors file for a single file)")
    merge.add_argument("--device", default="cpu", metavar="{cpu,cuda,auto}", help="where the math runs (default cpu)")
    merge.add_argument("--max-shard-size", type=_size, default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE", help="bytes per output shard, e.g. 5GB (default), 500MB, 2GiB")
    merge.add_argument("--force", action="store_true", help="replace an existing output (once the new one is complete)")
    merge.add_argument(
        "--distributed",
        action="store_true",
        help="split the merge over the processes of a torchrun launch (one per GPU, or CPU processes with gloo): "
        "torchrun --nproc-per-node N $(which lowrank-merge) merge ... --distributed",
    )
    noise = merge.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    noise.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    _settings_options(merge)
    merge.set_defaults(handler=run_merge)

    inspect = commands.add_parser(
        "inspect",
        help="check models and show what a merge would do",
        description="Check that the models are compatible and print, per tensor group, what a merge would do.",
    )
    inspect.add_argument("inputs", nargs="*", metavar="MODEL", help="model folders or weight files")
    inspect.add_argument("--plan", type=int, metavar="N", help="show how a --distributed merge over N processes splits the tensors")
    inspect.add_argument("--plan-device", choices=("cpu", "cuda"), default="cpu", help="device the plan's cost model assumes (default cpu)")
    _settings_options(inspect)
    inspect.set_defaults(handler=run_inspect)

    demo = commands.add_parser(
        "demo",
        help="run the offline multi-task merging benchmark (needs the eval extra)",
        description="Train a small ViT on T offline tasks (cached), merge with every method, "
        "and report per-task accuracy, the CART rank curve and a plot.",
    )
    add_demo_arguments(demo)
    demo.add_argument("-v", "--verbose", action="store_true", help="print tracebacks with errors")
    demo.set_defaults(handler=run_demo)
    return parser


def _config_from_args(args: argparse.Namespace, *, needs_out: bool) -> tuple[MergeConfig, str | None]:
    """The merge config (``--config`` with command-line overrides) and the output path."""
    inputs = list(args.inputs)
    out = getattr(args, "out", None)
    if args.config is not None:
        config = load_config(args.config)
        if needs_out and out is None:
            if not inputs:
                raise UsageError(f"with --config, give the output folder: {PROG} merge --config {args.config} DIR")
            out = inputs.pop()
        if inputs:
            where = "give only the output folder on the command line" if needs_out else "give no model paths with it"
            raise UsageError(f"models come from --config; {where}")
    else:
        if not inputs:
            raise UsageError("no models given: list MODEL_1 ... MODEL_T (or use --config)")
        if needs_out and out is None:
            raise UsageError("no output given: add --out DIR")
        config = MergeConfig(models=inputs)
    keys = ("rank_ratio", "rank", "scale", "density", "trim", "common_fraction", "preset", "include", "exclude")
    parameters = {key: getattr(args, key) for key in (*keys, "svd", "niter", "oversample", "seed")}
    config = config.with_overrides(
        merge_method=args.method, parameters=parameters, base_model=args.base, dtype=args.dtype, out_dtype=args.out_dtype
    )
    return config, out


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _distributed_group(device: torch.device) -> Iterator[torch.device]:
    """Join the torchrun launch: the process group (NCCL on GPUs, gloo on CPUs)
    and this process's device (``cuda:LOCAL_RANK``)."""
    import torch
    import torch.distributed as dist

    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UsageError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing): "
            f"torchrun --nproc-per-node N $(which {PROG}) merge ... --distributed"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def run_merge(args: argparse.Namespace) -> int:
    from .streaming import resolve_device

    config, out = _config_from_args(args, needs_out=True)
    device = resolve_device(args.device)
    if not args.distributed:
        return _merge(args, config, out, device, rank=0)
    with _distributed_group(device) as device:
        return _merge(args, config, out, device, rank=int(os.environ["RANK"]))


def _merge(args: argparse.Namespace, config: MergeConfig, out: str, device: torch.device, rank: int) -> int:
    from .streaming import merge_checkpoints, plan_merge

    settings = config.settings(device=device)
    quiet = args.quiet or rank != 0  # one voice: rank 0's
    progress = not quiet and (args.progress or sys.stderr.isatty())

    def checked(inputs) -> None:
        if quiet:
            return
        planned = plan_merge(inputs, settings.compute)
        written = sum(spec.nbytes for _, spec in planned)
        _say(
            f"checked {len(inputs.readers)} models: {len(planned)} tensors "
            f"({_totals([_action(plan.action, settings.spec) for plan, _ in planned], settings.spec)}), "
            f"reading {format_size(inputs.total_bytes(settings.spec))}, writing {format_size(written)} to {out}"
        )

    result = merge_checkpoints(
        config.models,
        out,
        settings,
        base=config.base_model,
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=progress,
        on_checked=checked,
        distributed=args.distributed,
    )
    if not quiet:
        rate = result.bytes_read / result.seconds if result.seconds > 0 else float("inf")
        # A distributed merge's result is this rank's share of the work; the files are the whole output.
        share = " rank 0's share:" if args.distributed else ""
        _say(
            f"merged {len(config.models)} models into {result.path} with {settings.spec.name} ({len(result.files)} files);"
            f"{share} {format_size(result.bytes_written)} written in {result.seconds:.1f} s ({format_size(rate)}/s read)"
        )
    return 0


def _action(action: str, spec: MethodSpec) -> str:
    """What ``spec`` does to a tensor that CART's plan gives ``action``: CART's
    own plan (``low_rank``, ``average``, ``copy``); for the other methods
    ``svd`` for the matrices an SVD method decomposes, ``copy`` for
    non-floating tensors and the method's name for the tensors its
    elementwise rule merges."""
    if action == "copy" or spec.name == "cart":
        return action
    return "svd" if spec.uses_svd and action == "low_rank" else spec.name


def _totals(actions: Sequence[str], spec: MethodSpec) -> str:
    """``13 low-ranked, 21 averaged, 3 copied``: how many tensors get each action."""
    words = {
        "low_rank": "low-ranked",
        "svd": f"decomposed by {spec.name}",
        spec.name: f"merged elementwise by {spec.name}",
        "average": "averaged",
        "copy": "copied",
    }
    counts = Counter(actions)
    return ", ".join(f"{counts[action]} {word}" for action, word in words.items() if counts[action])


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flops(count: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f}"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape) if shape else "scalar"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def run_inspect(args: argparse.Namespace) -> int:
    from .streaming import inspect_plan, open_models, plan_merge

    config, _ = _config_from_args(args, needs_out=False)
    settings = config.settings()
    spec, compute = settings.spec, settings.compute
    inputs = open_models(config.models, config.base_model)
    groups = inspect_plan(inputs, compute)
    planned = plan_merge(inputs, compute)
    # The rank and FLOP columns model CART's engines; the other methods show "-".
    estimated = spec.name == "cart"
    per_model = inputs.readers[0].total_bytes()
    lines = [f"{len(inputs.readers)} models, compatible: {len(inputs.metas)} tensors, {format_size(per_model)} per model"]
    for reader in inputs.readers + ([inputs.base] if inputs.base is not None else []):
        kind = "safetensors" if type(reader).__name__.startswith("Safetensors") else "torch"
        base = " (checked only)" if reader is inputs.base and not spec.needs_base else ""
        lines.append(f"  {reader.label}{base}: {kind}, {len(reader.files)} file(s)")
    parts = [f"method={spec.name}", *(f"{key}={_value(value)}" for key, value in method_parameters(settings).items())]
    if spec.uses_svd:
        given = ", ".join(f"{key}={value}" for key in ("niter", "oversample") if (value := getattr(compute, key)) is not None)
        parts.append(f"svd={compute.svd}" + (f" ({given})" if given else "") + f", seed={compute.seed}")
    parts.append(f"dtype={dtype_name(compute.compute_dtype)}")
    if compute.out_dtype is not None:
        parts.append(f"out_dtype={dtype_name(compute.out_dtype)}")
    lines.append("settings: " + ", ".join(parts))
    lines.append("")
    rows = [["tensor group", "count", "shape", "dtype", "action", "k", "bytes/model", "~FLOP"]]
    for group in groups:
        action = _action(group.action, spec)
        rows.append(
            [
                group.pattern,
                str(group.count),
                _shape(group.shape),
                dtype_name(group.dtype),
                "low-rank" if action == "low_rank" else action,
                str(group.rank) if action == "low_rank" else "-",
                format_size(group.bytes_per_model),
                _flops(group.flops) if estimated else "-",
            ]
        )
    lines.extend(_table(rows, right={1, 5, 6, 7}))
    written = sum(tensor.nbytes for _, tensor in planned)
    work = f"; about {_flops(sum(group.flops for group in groups))}FLOP of work" if estimated else ""
    lines.append("")
    lines.append(
        f"total: {len(planned)} tensors ({_totals([_action(plan.action, spec) for plan, _ in planned], spec)}); "
        f"reads {format_size(inputs.total_bytes(spec))}, writes {format_size(written)}{work}"
    )
    if args.plan is not None:
        lines += [""] + _plan_lines(inputs, settings, args.plan, args.plan_device)
    print("\n".join(lines))
    return 0


def _plan_lines(inputs, settings, processes: int, device: str) -> list[str]:
    """The per-rank table of a distributed merge over ``processes`` ranks."""
    from .distributed import FLOPS_PER_SECOND, READ_BYTES_PER_SECOND, balanced_plan, tensor_costs

    if processes < 1:
        raise UsageError(f"--plan needs a positive number of processes, got {processes}")
    shares = balanced_plan(tensor_costs(inputs, settings, device), processes)
    rows = [["rank", "tensors", "reads", "~FLOP", "~time"]]
    for share in shares:
        rows.append([str(share.rank), str(len(share.names)), format_size(share.bytes_read), _flops(share.flops), f"{share.seconds:.2f} s"])
    seconds = [share.seconds for share in shares]
    mean = sum(seconds) / processes
    lines = [
        f"plan of a --distributed merge over {processes} processes (cost model: reads at "
        f"{format_size(READ_BYTES_PER_SECOND)}/s, {_flops(FLOPS_PER_SECOND[device])}FLOP/s on {device}):"
    ]
    lines.extend(_table(rows, right={1, 2, 3, 4}))
    if mean > 0:
        lines.append(f"balance: the busiest rank has {max(seconds) / mean:.2f}x the mean estimated time ({max(seconds):.2f} s)")
    return lines


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that partial output is removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        with _terminate_as_interrupt():
            return args.handler(args)
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        _say("interrupted; no output was written")
        return 130
    except UsageError as error:
        _say(f"error: {error}")
        return 2
    except Exception as error:  # one line for the user, the traceback with --verbose
        if args.verbose:
            traceback.print_exc()
        known = isinstance(error, (ValueError, TypeError, OSError))
        prefix = "" if known else f"{type(error).__name__}: "
        hint = "" if known or args.verbose else " (run with --verbose for the traceback)"
        _say(f"error: {prefix}{one_line(error)}{hint}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
