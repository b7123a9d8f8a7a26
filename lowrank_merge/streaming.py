"""Merging checkpoints on disk, one tensor name at a time.

:func:`merge_checkpoints` opens every input and checks it from the file
headers (keys, shapes, dtypes, readable files), checks the output (exists?
writable? room on disk?), and only then walks the tensors in the order they lie
in the first model: read the T tensors of one name (and the base's, for the
methods that need it), merge them with the method's
:func:`~lowrank_merge.merge_method_tensor`, write the result into the pending
output shard, drop everything. At any moment it holds the input tensors of one
name, the method's work buffers and the one merged tensor being written; the
result equals :func:`~lowrank_merge.merge` on the same tensors exactly. A
method with a whole-model pre-pass (TIES with ``trim="model"``) first streams
the checkpoints the same way to collect its statistics.

With a CUDA device, a background thread reads the next name's tensors into
pinned memory and copies them to the GPU on a side stream while the current one
is merged.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoints import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointReader,
    ShardedWriter,
    TensorSpec,
    check_output_is_not_an_input,
    check_output_target,
    open_checkpoint,
    small_files_to_copy,
)
from ._ops import huge_page_allocations
from .cart import MergeSettings, TensorPlan, output_dtype, plan_tensor
from .config import dtype_name, merge_record, record_yaml
from .engines import engine_flops
from .methods import MethodSettings, MethodSpec, TensorItem, check_base, merge_method_tensor, method_settings, prepare
from .validation import TensorMeta, check_compatible

PathLike = str | os.PathLike[str]


@dataclass
class CheckedInputs:
    """Opened, mutually compatible models (and the base model, if any)."""

    readers: list[CheckpointReader]
    labels: list[str]
    base: CheckpointReader | None
    #: The first model's tensors in on-disk order: the order of the merge.
    metas: dict[str, TensorMeta]

    def read_by(self, spec: MethodSpec) -> list[CheckpointReader]:
        """The checkpoints a merge with ``spec`` reads: the T models, then the
        base where the method needs it (otherwise the base is only checked)."""
        return self.readers + ([self.base] if spec.needs_base else [])

    def total_bytes(self, spec: MethodSpec) -> int:
        """Bytes one pass of a merge with ``spec`` reads."""
        return sum(reader.total_bytes() for reader in self.read_by(spec))


def open_models(models: Sequence[PathLike], base: PathLike | None = None) -> CheckedInputs:
    """Open every model (and the base) and check them against each other from
    their headers alone. Errors name the model and the tensor."""
    if isinstance(models, (str, os.PathLike)) or len(models) == 0:
        raise ValueError("no models to merge: pass at least one model path")
    readers = [open_checkpoint(path) for path in models]
    labels = [reader.label for reader in readers]
    base_reader = None if base is None else open_checkpoint(base, label=f"base model {os.fspath(base)}")
    checked = readers + ([base_reader] if base_reader is not None else [])
    check_compatible([reader.metas() for reader in checked], [reader.label for reader in checked])
    return CheckedInputs(readers, labels, base_reader, readers[0].metas())


def plan_merge(inputs: CheckedInputs, settings: MergeSettings) -> list[tuple[TensorPlan, TensorSpec]]:
    """CART's plan of each tensor (``settings``: a method's ``.compute``) and the
    output tensor it becomes; the output tensors are the same for every method."""
    planned = []
    for name, meta in inputs.metas.items():
        plan = plan_tensor(name, meta, settings)
        # output_dtype only reads .dtype, which the metadata carries.
        planned.append((plan, TensorSpec(name, meta.shape, output_dtype(plan, meta, settings))))
    return planned


def estimate_flops(plan: TensorPlan, models: int, settings: MergeSettings) -> float:
    """A rough count of floating-point operations to merge one tensor name
    (for ``inspect``; the leading terms of each engine, not a measurement)."""
    numel = math.prod(plan.shape)
    if plan.action == "copy":
        return 0.0
    if plan.action == "average" or models == 1 or plan.rank >= min(plan.shape):
        return float(models * numel)
    m, n = plan.shape
    engine, niter, width = settings.layer_engine(m, n, plan.rank)
    per_task = engine_flops(engine, m, n, plan.rank, niter, width)
    return float(models * (per_task + 3 * numel) + 2 * m * n * models * plan.rank)


@dataclass
class MergeResult:
    """What :func:`merge_checkpoints` wrote; ``bytes_read`` counts every pass
    over the inputs (a pre-pass included) and the base where it was read."""

    path: Path
    files: list[str]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``None``/``"cpu"`` -> CPU, ``"auto"`` -> CUDA when available, ``"cuda[:i]"`` checked."""
    if device is None:
        return torch.device("cpu")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported; use cpu, cuda or auto")
    return device


# ---------------------------------------------------------------------------
# Reading the T tensors of one name, optionally one name ahead
# ---------------------------------------------------------------------------

Loader = Callable[[str], object]


def _cpu_loader(readers: Sequence[CheckpointReader]) -> tuple[Loader, Callable[[object], list[Tensor]]]:
    def load(name: str) -> list[Tensor]:
        return [reader.read(name) for reader in readers]

    return load, lambda layer: layer


def _cuda_loader(
    readers: Sequence[CheckpointReader], device: torch.device
) -> tuple[Loader, Callable[[object], list[Tensor]]]:
    """Read into pinned memory and copy to ``device`` on a side stream.

    ``load`` runs in the reading thread; ``ready`` runs in the merging thread
    and makes its stream wait for the copies.
    """
    copy_stream = torch.cuda.Stream(device=device)

    def load(name: str) -> tuple[list[Tensor], list[Tensor], torch.cuda.Event]:
        host = []
        for reader in readers:
            tensor = reader.read(name)
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            pinned.copy_(tensor)
            host.append(pinned)
            del tensor
        with torch.cuda.stream(copy_stream):
            on_device = [tensor.to(device, non_blocking=True) for tensor in host]
            event = torch.cuda.Event()
            event.record(copy_stream)
        return on_device, host, event

    def ready(layer: object) -> list[Tensor]:
        on_device, host, event = layer
        stream = torch.cuda.current_stream(device)
        stream.wait_event(event)
        for tensor in on_device:
            tensor.record_stream(stream)  # allocated on the copy stream, used (and freed) on this one
        return on_device

    return load, ready


def iterate_layers(
    readers: Sequence[CheckpointReader],
    names: Sequence[str],
    device: torch.device,
    prefetch: bool,
) -> Iterator[tuple[str, list[Tensor]]]:
    """``(name, [T tensors])`` in order; with ``prefetch`` the next name is read
    in a background thread while the caller merges the current one. Either way
    the kernel is asked to read the next name's bytes from disk ahead
    (:meth:`CheckpointReader.will_need`)."""
    read_name, ready = _cuda_loader(readers, device) if device.type == "cuda" and prefetch else _cpu_loader(readers)

    def load(position: int) -> object:
        if position + 1 < len(names):
            for reader in readers:
                reader.will_need(names[position + 1])
        return read_name(names[position])

    if not prefetch:
        for position, name in enumerate(names):
            yield name, ready(load(position))
        return
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowrank-merge-read")
    try:
        future = pool.submit(load, 0) if names else None
        for position, name in enumerate(names):
            layer = ready(future.result())
            future = pool.submit(load, position + 1) if position + 1 < len(names) else None
            yield name, layer
            del layer
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------
# The merge
# ---------------------------------------------------------------------------


def _progress_bar(enabled: bool, total: int):
    """A tqdm bar of bytes read per pass (None when not ``enabled``)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


def _config_json(data: bytes, out_dtype: torch.dtype | None) -> bytes:
    """The first model's config.json, with its dtype updated when the output dtype changed."""
    if out_dtype is None:
        return data
    try:
        config = json.loads(data)
    except ValueError:
        return data
    if not isinstance(config, dict):
        return data
    changed = False
    for key in ("torch_dtype", "dtype"):
        if isinstance(config.get(key), str):
            config[key] = dtype_name(out_dtype)
            changed = True
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8") if changed else data


@dataclass
class PreparedMerge:
    """Everything a merge decides before it reads a weight: the checked inputs,
    the plan of every tensor, the output writer (not started) and the device."""

    settings: MethodSettings
    inputs: CheckedInputs
    planned: list[tuple[TensorPlan, TensorSpec]]
    writer: ShardedWriter
    device: torch.device


def prepare_merge(
    models: Sequence[PathLike],
    out: PathLike,
    settings: MethodSettings,
    *,
    base: PathLike | None,
    max_shard_size: int,
    force: bool,
    copy_files: bool,
    writer_layout: Callable[[CheckedInputs, list[TensorSpec]], tuple[list[TensorSpec], dict]] | None = None,
) -> PreparedMerge:
    """Check the inputs and the output (from headers, before any weight is
    read) and set up the writer: shards, metadata, config and merge record.

    ``writer_layout(inputs, specs)`` may reorder the output tensors and add
    ``ShardedWriter`` keyword arguments (the distributed merge: an explicit
    ``shards`` plan and the shards this process ``owned``)."""
    spec = settings.spec
    check_base(spec, base)
    out = Path(out)
    model_paths = [os.fspath(path) for path in models] if not isinstance(models, (str, os.PathLike)) else []
    base_path = None if base is None else os.fspath(base)
    check_output_target(out, force=force, inputs=[Path(p) for p in model_paths + ([base_path] if base_path else [])])
    compute = settings.compute
    device = resolve_device(compute.device)
    inputs = open_models(model_paths, base_path)
    opened = inputs.readers + ([inputs.base] if inputs.base is not None else [])
    check_output_is_not_an_input(out, [file for reader in opened for file in reader.input_files()])
    planned = plan_merge(inputs, compute)
    record = merge_record(model_paths, base_path, settings)
    metadata = {
        "format": "pt",
        "merge_method": spec.name,
        "merge_config": json.dumps(record, separators=(",", ":")),
        "lowrank_merge_version": record["lowrank_merge_version"],
    }
    specs = [tensor_spec for _, tensor_spec in planned]
    specs, layout = writer_layout(inputs, specs) if writer_layout is not None else (specs, {})
    writer = ShardedWriter(out, specs, max_shard_size=max_shard_size, metadata=metadata, force=force, **layout)
    if not writer.single_file:
        source = inputs.readers[0].source_dir
        if copy_files and source is not None:
            for path in small_files_to_copy(source):
                if path.name == "config.json":
                    writer.add_file(path.name, _config_json(path.read_bytes(), compute.out_dtype))
                else:
                    writer.add_file(path.name, path)
        writer.add_file("merge_config.yaml", record_yaml(record).encode("utf-8"))
    writer.check_space()
    return PreparedMerge(settings, inputs, planned, writer, device)


def merge_names(
    prepared: PreparedMerge, names: Sequence[str], *, prefetch: bool, progress: bool, total_bytes: int | None = None
) -> tuple[int, float]:
    """Merge ``names`` (in order) into the started writer: read the T tensors
    of a name, merge, write, drop. Runs the method's pre-pass first. Returns
    the bytes read (every pass) and the seconds taken."""
    settings, inputs, writer = prepared.settings, prepared.inputs, prepared.writer
    spec = settings.spec
    readers = inputs.read_by(spec)
    tasks = len(inputs.readers)
    bytes_read = 0
    bar = _progress_bar(progress, inputs.total_bytes(spec) if total_bytes is None else total_bytes)

    def tensor_items(stage: str) -> Iterator[TensorItem]:
        """One pass over the checkpoints: ``(name, [T tensors], base tensor or None)``."""
        nonlocal bytes_read
        if bar is not None:
            bar.set_description_str(f"{stage} 0/{len(names)}", refresh=False)
            bar.reset()
        for position, (name, tensors) in enumerate(iterate_layers(readers, names, prepared.device, prefetch)):
            yield name, tensors[:tasks], tensors[tasks] if spec.needs_base else None
            del tensors  # before the next read
            layer_bytes = sum(reader.nbytes(name) for reader in readers)
            bytes_read += layer_bytes
            if bar is not None:
                bar.set_description_str(f"{stage} {position + 1}/{len(names)}", refresh=False)
                bar.update(layer_bytes)

    try:
        started = time.perf_counter()
        with huge_page_allocations(prepared.device):  # one scope: each layer reuses the previous layers' buffers
            labels = inputs.labels + ([inputs.base.label] if inputs.base is not None else [])
            settings = prepare(settings, lambda: tensor_items(f"{spec.name} pre-pass"), labels)
            for name, tensors, base_tensor in tensor_items(f"{spec.name} merge"):
                try:
                    merged = merge_method_tensor(name, tensors, base_tensor, settings, labels)
                except RuntimeError as error:  # most torch errors do not name the tensor
                    if repr(name) in str(error):
                        raise
                    raise RuntimeError(f"while merging tensor {name!r}: {error}") from error
                del tensors, base_tensor
                writer.write(name, merged)
                del merged
    finally:
        if bar is not None:
            bar.close()
    return bytes_read, time.perf_counter() - started


def merge_checkpoints(
    models: Sequence[PathLike],
    out: PathLike,
    settings: MethodSettings | None = None,
    *,
    base: PathLike | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool = False,
    prefetch: bool | None = None,
    copy_files: bool = True,
    on_checked: Callable[[CheckedInputs], None] | None = None,
    distributed: bool = False,
) -> MergeResult:
    """Merge T checkpoints on disk into ``out`` with any method, streaming.

    Args:
        models: T model folders or weight files (see
            :func:`~lowrank_merge.checkpoints.open_checkpoint`).
        out: output folder (Hugging Face layout; the first model's config and
            tokenizer files are copied) or a ``.safetensors`` file.
        settings: :func:`~lowrank_merge.method_settings` of the method
            (default: CART with its defaults). ``settings.compute.device``
            picks where the math runs.
        base: the pretrained model: read by the methods that need it
            (``settings.spec.needs_base``), checked for compatibility only by
            the others.
        max_shard_size: bytes of tensor data per output shard.
        force: replace an existing ``out`` (only once the new one is complete).
        progress: show a tqdm bar (bytes read per second, ETA).
        prefetch: read the next tensor while merging the current one
            (default: on for CUDA, off for CPU).
        on_checked: called once every input and the output were checked,
            before the first tensor is read.
        distributed: split the work over the processes of the initialised
            ``torch.distributed`` group (launched with ``torchrun``); every
            process calls this with the same arguments (see
            :mod:`lowrank_merge.distributed`). The result equals the
            single-process merge's tensor for tensor.

    The output appears under ``out`` only when complete: on any error or
    interruption the temporary output is removed.
    """
    settings = method_settings("cart") if settings is None else settings
    if distributed:
        from .distributed import merge_checkpoints_distributed

        return merge_checkpoints_distributed(
            models, out, settings, base=base, max_shard_size=max_shard_size, force=force,
            progress=progress, prefetch=prefetch, copy_files=copy_files, on_checked=on_checked,
        )
    prepared = prepare_merge(
        models, out, settings, base=base, max_shard_size=max_shard_size, force=force, copy_files=copy_files
    )
    writer = prepared.writer
    writer.start()  # the temporary output next to the target: proves it writable
    try:
        if on_checked is not None:
            on_checked(prepared.inputs)
        names = list(prepared.inputs.metas)
        bytes_read, seconds = merge_names(
            prepared, names, prefetch=prepared.device.type == "cuda" if prefetch is None else prefetch, progress=progress
        )
        writer.commit()
    finally:
        if not writer.committed:
            writer.abort()
    out = Path(out)
    files = [out.name] if writer.single_file else sorted(os.listdir(out))
    return MergeResult(out, files, len(names), bytes_read, writer.data_bytes, seconds)


# ---------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------

_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def group_pattern(name: str) -> str:
    """``model.layers.12.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``."""
    return _LAYER_NUMBER.sub("*", name)


@dataclass
class TensorGroup:
    pattern: str
    action: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    rank: int | None
    count: int = 0
    bytes_per_model: int = 0
    flops: float = 0.0


def inspect_plan(inputs: CheckedInputs, settings: MergeSettings) -> list[TensorGroup]:
    """Tensors grouped by name pattern (layer numbers as ``*``), shape, dtype and action."""
    groups: dict[tuple, TensorGroup] = {}
    models = len(inputs.readers)
    for plan, spec in plan_merge(inputs, settings):
        meta = inputs.metas[plan.name]
        key = (group_pattern(plan.name), plan.action, plan.shape, meta.dtype, plan.rank)
        group = groups.get(key)
        if group is None:
            group = groups[key] = TensorGroup(key[0], plan.action, plan.shape, meta.dtype, plan.rank)
        group.count += 1
        group.bytes_per_model += inputs.readers[0].nbytes(plan.name)
        group.flops += estimate_flops(plan, models, settings)
    return list(groups.values())
