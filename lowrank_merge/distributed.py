"""Merging checkpoints across processes and machines with ``torch.distributed``.

Launch one process per device with ``torchrun`` and call
:func:`~lowrank_merge.merge_checkpoints` with ``distributed=True`` in every
process (the CLI: ``torchrun --nproc-per-node N $(which lowrank-merge) merge
... --distributed``). A merge's per-tensor work is independent, so:

1. Every process checks the inputs and the output from the headers and
   computes the same :func:`balanced_plan`: each tensor name goes to one rank,
   greedily by estimated cost (bytes read at ``READ_BYTES_PER_SECOND`` plus
   decomposition FLOPs at the device's ``FLOPS_PER_SECOND``), largest first,
   each to the least-loaded rank.
2. Each rank's tensors get shards of their own (``model-0000k-of-0000N``
   numbered across ranks), so ranks never share a file.
3. Rank 0 creates the temporary output folder; every rank reads only its own
   tensors from the shared checkpoint files, merges them on its own device
   (``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo) and writes its shards.
4. The ranks exchange their outcome; rank 0 writes the index, config and
   metadata and moves the folder into place only if every rank succeeded.
   Any failure (a bad input, an out-of-memory error, an exception on any rank)
   aborts every rank with a message naming the rank, and leaves no output.

The merged tensors are bitwise those of the single-process merge: each is
computed from the same inputs by the same code, and the sketch of a layer is
seeded by the merge's seed alone, not by where or in which order the layer is
merged. A method with a whole-model pre-pass (TIES with ``trim="model"``) is
refused: its statistics would need a reduction across ranks.

A process that dies without an exception (killed, segfault) cannot report; the
torchrun agent then stops the others (SIGTERM, which the CLI turns into a clean
abort), and a temporary folder left by a SIGKILL is removed by the next merge
to the same target.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .checkpoints import DEFAULT_MAX_SHARD_SIZE, TensorSpec, plan_shards
from .methods import MethodSettings, needs_prepass
from .streaming import (
    CheckedInputs,
    MergeResult,
    PathLike,
    PreparedMerge,
    estimate_flops,
    merge_names,
    plan_merge,
    prepare_merge,
)

#: Nominal rates that turn bytes and FLOPs into one cost (seconds) for the
#: plan: checkpoint reads from a fast local disk, and the dense rate of the
#: device that merges (CPU: the 2-core development machine's sgemm; CUDA: a
#: fraction of an H100's TF32 rate). Only their ratio shapes the plan.
READ_BYTES_PER_SECOND = 2e9
FLOPS_PER_SECOND = {"cpu": 2e11, "cuda": 5e13}


_Result = TypeVar("_Result")


class DistributedMergeError(RuntimeError):
    """A distributed merge failed on some rank; no output was written."""


@dataclass
class RankShare:
    """The tensor names one rank merges (in on-disk order) and their estimated cost."""

    rank: int
    names: list[str]
    bytes_read: int = 0
    flops: float = 0.0
    seconds: float = 0.0


def tensor_costs(
    inputs: CheckedInputs, settings: MethodSettings, device_type: str = "cpu"
) -> dict[str, tuple[int, float, float]]:
    """``name -> (bytes read, FLOPs, estimated seconds)`` of merging each tensor."""
    readers = inputs.read_by(settings.spec)
    flop_rate = FLOPS_PER_SECOND.get(device_type, FLOPS_PER_SECOND["cpu"])
    costs = {}
    for plan, _ in plan_merge(inputs, settings.compute):
        nbytes = sum(reader.nbytes(plan.name) for reader in readers)
        flops = estimate_flops(plan, len(inputs.readers), settings.compute)
        costs[plan.name] = (nbytes, flops, nbytes / READ_BYTES_PER_SECOND + flops / flop_rate)
    return costs


def balanced_plan(
    costs: dict[str, tuple[int, float, float]], world_size: int
) -> list[RankShare]:
    """Assign each tensor name to one of ``world_size`` ranks.

    Longest processing time first: names by decreasing estimated seconds
    (ties: on-disk order), each to the rank with the least load so far (ties:
    the lowest rank); within a rank, names keep their on-disk order, so a
    rank's reads move forward through the files. Deterministic: every rank
    computes the same plan. ``costs`` is :func:`tensor_costs` (in on-disk order).
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"the number of ranks must be a positive integer, got {world_size!r}")
    order = {name: position for position, name in enumerate(costs)}
    shares = [RankShare(rank, []) for rank in range(world_size)]
    for name in sorted(costs, key=lambda name: (-costs[name][2], order[name])):
        share = min(shares, key=lambda share: (share.seconds, share.rank))
        nbytes, flops, seconds = costs[name]
        share.names.append(name)
        share.bytes_read += nbytes
        share.flops += flops
        share.seconds += seconds
    for share in shares:
        share.names.sort(key=order.__getitem__)
    return shares


def shard_layout(
    shares: Sequence[RankShare], specs: Sequence[TensorSpec], max_shard_size: int
) -> tuple[list[TensorSpec], list[list[TensorSpec]], list[list[int]]]:
    """The output layout of a distributed merge: ``(specs in shard order, shards,
    shard indices per rank)``. Every rank's tensors fill shards of their own;
    an empty model still gets one (empty) shard, rank 0's."""
    by_name = {spec.name: spec for spec in specs}
    shards: list[list[TensorSpec]] = []
    owned: list[list[int]] = []
    for share in shares:
        mine = plan_shards([by_name[name] for name in share.names], max_shard_size) if share.names else []
        owned.append(list(range(len(shards), len(shards) + len(mine))))
        shards.extend(mine)
    if not shards:
        shards, owned[0] = [[]], [0]
    return [spec for shard in shards for spec in shard], shards, owned


def _process_group() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "a distributed merge needs an initialised torch.distributed process group: launch with "
            "torchrun and pass --distributed (the CLI initialises the group), or call "
            "torch.distributed.init_process_group first"
        )
    return dist.get_rank(), dist.get_world_size()


def _agree(step: Callable[[], _Result]) -> _Result:
    """Run ``step`` on every rank; if it failed on any rank, raise on every rank.

    The error names the failing ranks and their messages (a rank's own
    exception is chained). One ``all_gather_object`` per call.
    """
    import torch.distributed as dist

    result, error = None, None
    try:
        result = step()
    except Exception as caught:  # reported to every rank, then raised everywhere
        error = caught
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
    failures = [f"rank {rank}: {message}" for rank, message in enumerate(outcomes) if message is not None]
    if failures:
        raise DistributedMergeError(f"distributed merge failed, no output written ({'; '.join(failures)})") from error
    return result


def merge_checkpoints_distributed(
    models: Sequence[PathLike],
    out: PathLike,
    settings: MethodSettings,
    *,
    base: PathLike | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = False,
    prefetch: bool | None = None,
    copy_files: bool = True,
    on_checked: Callable[[CheckedInputs], None] | None = None,
) -> MergeResult:
    """:func:`~lowrank_merge.merge_checkpoints` over the ranks of the initialised
    process group (see the module docstring). Every rank calls it with the same
    arguments; each returns its own share of the work (the tensors it merged,
    its bytes read and written; ``files``: rank 0 lists the whole output, the
    other ranks the shards they wrote)."""
    import torch.distributed as dist

    rank, world_size = _process_group()
    out = Path(out)
    shares: list[RankShare] = []
    device = settings.compute.device

    def layout(inputs: CheckedInputs, specs: list[TensorSpec]) -> tuple[list[TensorSpec], dict]:
        shares[:] = balanced_plan(tensor_costs(inputs, settings, device.type if device else "cpu"), world_size)
        ordered, shards, owned = shard_layout(shares, specs, max_shard_size)
        return ordered, {"shards": shards, "owned": owned[rank]}

    def check() -> PreparedMerge:
        if out.suffix == ".safetensors":
            raise ValueError(f"a distributed merge writes a folder, not the single file {out}")
        if needs_prepass(settings):
            raise ValueError(
                f"method {settings.spec.name!r} with these settings needs a whole-model pre-pass, which a "
                "distributed merge does not support (for TIES, use trim='tensor')"
            )
        return prepare_merge(
            models, out, settings, base=base, max_shard_size=max_shard_size, force=force, copy_files=copy_files,
            writer_layout=layout,
        )

    prepared = _agree(check)
    writer, share = prepared.writer, shares[rank]
    try:
        _agree(lambda: writer.start() if rank == 0 else None)  # rank 0 creates the temporary folder
        temporary = [writer.temporary_path]
        dist.broadcast_object_list(temporary, src=0)
        _agree(lambda: writer.start(attach_to=temporary[0]) if rank != 0 else None)
        if on_checked is not None and rank == 0:
            on_checked(prepared.inputs)

        def merge_share() -> tuple[int, float]:
            done = merge_names(
                prepared, share.names, prefetch=prepared.device.type == "cuda" if prefetch is None else prefetch,
                progress=progress and rank == 0, total_bytes=share.bytes_read,
            )
            writer.finish_shards()
            return done

        bytes_read, seconds = _agree(merge_share)
        _agree(lambda: writer.commit() if rank == 0 else None)
    except DistributedMergeError:
        writer.abort()
        # Every rank raised this together, so every rank is alive: none exits
        # before all have cleaned up. (torchrun stops the other ranks as soon as
        # one exits with an error, which cut rank 0's removal of the temporary
        # folder short.)
        dist.barrier()
        raise
    except BaseException:
        writer.abort()
        raise
    files = sorted(os.listdir(out)) if rank == 0 else [writer.shard_names[index] for index in sorted(writer.owned)]
    return MergeResult(out, files, len(share.names), bytes_read, writer.data_bytes, seconds)
