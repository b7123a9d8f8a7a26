"""Checkpoints on disk, one tensor at a time.

Reading: :func:`open_checkpoint` turns a path into a :class:`CheckpointReader`
whose :meth:`~CheckpointReader.metas` come from file headers only (no weight is
read) and whose :meth:`~CheckpointReader.read` returns one tensor. Understood
layouts:

* Hugging Face folders: ``model.safetensors``, sharded
  ``model-0000k-of-0000N.safetensors`` with ``model.safetensors.index.json``,
  and (fallback) ``pytorch_model.bin`` or its sharded ``.bin`` index;
* single ``.safetensors`` files and ``.pt``/``.pth``/``.bin`` state dicts
  (``torch.load(weights_only=True, mmap=True)``).

Safetensors files are opened with ``safetensors.safe_open`` for each read and
closed right after, so the pages of a tensor stay mapped only while the tensor
lives: resident memory never grows with the model's size.

Writing: :class:`ShardedWriter` streams the merged tensors straight into
safetensors shards whose layout (and so headers) is planned up front from the
tensor shapes, inside a hidden temporary folder next to the target, and renames
it into place only when everything is written. Nothing is buffered beyond the
tensor being written.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import secrets
import shutil
import struct
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .validation import TensorMeta

#: Default ``--max-shard-size``: 5 GB, as in ``transformers``.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
#: Files never copied from the first model's folder: weights in any format.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".pkl", ".npz")
#: Non-weight files larger than this are not copied (they are not "small").
MAX_COPIED_FILE_SIZE = 100 * 2**20
#: Also not copied: the first model's card describes that model, not the merge.
SKIPPED_FILES = ("README.md", "merge_config.yaml")

#: Bytes of a shard written before the writer asks the kernel to start writing
#: them to disk (:func:`_start_writeback`), so that the fsync closing the shard
#: waits for the last ones only instead of the whole shard.
WRITEBACK_CHUNK = 8 * 2**20

_TMP_TAG = ".lowrank-merge-tmp-"
_OLD_TAG = ".lowrank-merge-old-"
_PARTIAL_MARKER = ".lowrank-merge-partial"

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": torch.complex64,
    }.items()
    if dtype is not None
}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or the output cannot be written; the
    message names the model (or output) and, where there is one, the tensor."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (for one-line CLI errors)."""
    return " ".join(str(error).split()) or type(error).__name__


def tensor_nbytes(meta: TensorMeta) -> int:
    return math.prod(meta.shape) * _element_size(meta.dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


class CheckpointReader:
    """One model on disk: tensor metadata from headers, tensors on demand."""

    label: str
    #: The model's folder when it was given as one (its config and tokenizer
    #: files are copied to the output), else None.
    source_dir: Path | None
    files: tuple[Path, ...]
    #: The shard index the files were listed in, if any (set by the index's opener).
    index_file: Path | None

    def __init__(self, label: str, source_dir: Path | None, files: Sequence[Path]) -> None:
        self.label = label
        self.source_dir = source_dir
        self.files = tuple(files)
        self.index_file = None
        self._metas: dict[str, TensorMeta] = {}
        self._locations: dict[str, Path] = {}

    def input_files(self) -> tuple[Path, ...]:
        """Every file the model is read from: its weight files and its index."""
        return self.files + ((self.index_file,) if self.index_file is not None else ())

    def metas(self) -> dict[str, TensorMeta]:
        """Name -> shape and dtype, in the order the tensors lie on disk."""
        return dict(self._metas)

    def names(self) -> list[str]:
        return list(self._metas)

    def nbytes(self, name: str) -> int:
        return tensor_nbytes(self._metas[name])

    def total_bytes(self) -> int:
        return sum(tensor_nbytes(meta) for meta in self._metas.values())

    def read(self, name: str) -> Tensor:
        """The tensor ``name`` on the CPU (may be backed by a private memory map)."""
        if name not in self._locations:
            raise CheckpointError(f"{self.label}: no tensor {name!r}")
        file = self._locations[name]
        try:
            tensor = self._read(file, name)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"{self.label}: cannot read tensor {name!r} from {file}: {one_line(error)}") from error
        meta = self._metas[name]
        if tuple(tensor.shape) != meta.shape or tensor.dtype != meta.dtype:
            raise CheckpointError(
                f"{self.label}: tensor {name!r} in {file} changed on disk since it was checked "
                f"(now {tensor.dtype} {list(tensor.shape)}, was {meta.dtype} {list(meta.shape)})"
            )
        return tensor

    def _read(self, file: Path, name: str) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def will_need(self, name: str) -> None:
        """Ask the kernel to start reading tensor ``name`` from disk into the
        page cache now, so that a later :meth:`read` finds it there. A hint:
        formats whose byte ranges are not known here ignore it."""

    def _add(self, name: str, meta: TensorMeta, file: Path) -> None:
        if name in self._metas:
            raise CheckpointError(f"{self.label}: tensor {name!r} appears in both {self._locations[name]} and {file}")
        self._metas[name] = meta
        self._locations[name] = file

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, {len(self._metas)} tensors in {len(self.files)} file(s))"


def _safetensors_byte_ranges(file: Path, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``name -> (offset, length)`` of each tensor's bytes in a safetensors file
    whose header ``safe_open`` has already validated (an 8-byte little-endian
    header size, the JSON header, then the data, which ``data_offsets`` index)."""
    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    data_start = 8 + header_size
    ranges = {}
    for name in names:
        begin, end = header[name]["data_offsets"]
        ranges[name] = (data_start + begin, end - begin)
    return ranges


class SafetensorsReader(CheckpointReader):
    """``.safetensors`` files, read with ``safe_open`` one tensor at a time."""

    def __init__(
        self, label: str, files: Sequence[Path], source_dir: Path | None = None, index: Mapping[str, Path] | None = None
    ) -> None:
        super().__init__(label, source_dir, files)
        self._byte_ranges: dict[str, tuple[int, int]] = {}  # name -> (file offset, length)
        wanted: dict[Path, set[str]] | None = None
        if index is not None:
            wanted = {}
            for name, file in index.items():
                wanted.setdefault(file, set()).add(name)
        for file in self.files:
            names, metas = self._header(file)
            if wanted is not None:
                missing = sorted(wanted.get(file, set()) - set(names))
                if missing:
                    raise CheckpointError(
                        f"{label}: tensor {missing[0]!r} is listed in the index under {file.name} "
                        f"but that file does not contain it" + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
                    )
                names = [name for name in names if name in wanted.get(file, ())]
            ranges = _safetensors_byte_ranges(file, names)
            # In on-disk order; safetensors breaks ties between equal offsets (empty
            # tensors) at random, so ties go by name: the same order in every run.
            for name in sorted(names, key=lambda name: (ranges[name][0], name)):
                self._add(name, metas[name], file)
            self._byte_ranges.update(ranges)

    def will_need(self, name: str) -> None:
        # POSIX_FADV_WILLNEED starts the reads and returns; the merge asks for
        # the next tensor while it merges the current one, so the disk and the
        # CPU work at the same time (a cold read otherwise happens page by page,
        # as the stack copies from the memory map).
        if not hasattr(os, "posix_fadvise") or name not in self._byte_ranges:
            return
        start, length = self._byte_ranges[name]
        try:
            descriptor = os.open(self._locations[name], os.O_RDONLY)
        except OSError:
            return  # read() reports what is wrong with the file
        try:
            os.posix_fadvise(descriptor, start, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(descriptor)

    def _header(self, file: Path) -> tuple[list[str], dict[str, TensorMeta]]:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                keys = getattr(handle, "offset_keys", handle.keys)()
                metas = {}
                for name in keys:
                    tensor_slice = handle.get_slice(name)
                    dtype_name = tensor_slice.get_dtype()
                    if dtype_name not in _SAFETENSORS_DTYPES:
                        raise CheckpointError(
                            f"{self.label}: tensor {name!r} in {file} has dtype {dtype_name}, which torch cannot hold"
                        )
                    metas[name] = TensorMeta(tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES[dtype_name])
        except CheckpointError:
            raise
        except OSError as error:
            raise CheckpointError(f"{self.label}: cannot read {file}: {error.strerror or one_line(error)}") from error
        except Exception as error:
            raise CheckpointError(
                f"{self.label}: {file} is not a valid safetensors file ({one_line(error)})"
            ) from error
        return list(keys), metas

    def _read(self, file: Path, name: str) -> Tensor:
        from safetensors import safe_open

        # Opened per read: the file's mapping lives only as long as the tensor,
        # so pages read earlier never pile up in the resident set.
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)


class TorchReader(CheckpointReader):
    """``torch.save`` state dicts (``.pt``, ``.pth``, ``.bin``), ``weights_only=True``.

    Zip-format files are memory-mapped and re-mapped after every
    ``window_factor`` x (largest tensor) bytes read, so the pages read stay
    bounded; legacy (non-zip) files cannot be mapped and are held in memory.
    """

    window_factor = 4

    def __init__(
        self, label: str, files: Sequence[Path], source_dir: Path | None = None, index: Mapping[str, Path] | None = None
    ) -> None:
        super().__init__(label, source_dir, files)
        self._mappable: dict[Path, bool] = {}
        self._held: dict[Path, Mapping[str, Tensor]] = {}  # legacy files, loaded whole
        self._current: tuple[Path, Mapping[str, Tensor]] | None = None
        self._read_since_load = 0
        for file in self.files:
            state = self._load(file, first=True)
            names = list(state)
            if index is not None:
                listed = {name for name, where in index.items() if where == file}
                missing = sorted(listed - set(names))
                if missing:
                    raise CheckpointError(
                        f"{label}: tensor {missing[0]!r} is listed in the index under {file.name} "
                        "but that file does not contain it"
                    )
                names = [name for name in names if name in listed]
            for name in names:
                self._add(name, TensorMeta.of(state[name]), file)
            if self._mappable[file]:
                del state
            else:
                self._held[file] = state
        sizes = [tensor_nbytes(meta) for meta in self._metas.values()]
        self._window = self.window_factor * max(sizes, default=0)

    def _load(self, file: Path, first: bool = False) -> Mapping[str, Tensor]:
        try:
            if self._mappable.get(file, True):
                try:
                    obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
                    self._mappable[file] = True
                except RuntimeError as error:
                    if "mmap" not in str(error) or not first:
                        raise
                    self._mappable[file] = False  # legacy format: no memory map
            if not self._mappable[file]:
                obj = torch.load(str(file), map_location="cpu", weights_only=True)
        except OSError as error:
            if not os.access(file, os.R_OK):
                raise CheckpointError(f"{self.label}: cannot read {file}: {error.strerror or one_line(error)}") from error
            raise CheckpointError(self._unreadable(file, error)) from error  # torch.load's error for a truncated zip
        except Exception as error:
            message = one_line(error)
            if "weights_only" in message or "Unsupported global" in message:
                raise CheckpointError(
                    f"{self.label}: {file} holds Python objects that torch.load(weights_only=True) refuses to "
                    "unpickle; save a plain state dict (or convert it to safetensors)"
                ) from error
            raise CheckpointError(self._unreadable(file, error)) from error
        return self._state_dict(obj, file)

    def _unreadable(self, file: Path, error: Exception) -> str:
        """torch.load's own errors for damaged files are cryptic (``OSError: Invalid
        argument``, ``KeyError: 101``): say what they mean, then quote them."""
        return (
            f"{self.label}: {file} is not a readable torch checkpoint: truncated, corrupt, or not written by "
            f"torch.save (torch.load: {type(error).__name__}: {one_line(error)})"
        )

    def _state_dict(self, obj: object, file: Path) -> Mapping[str, Tensor]:
        if isinstance(obj, Mapping) and not all(isinstance(value, Tensor) for value in obj.values()):
            for key in ("state_dict", "model"):
                inner = obj.get(key)
                if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                    obj = inner
                    break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{self.label}: {file} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
        for name, value in obj.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{self.label}: {file} has a non-string key {name!r}")
            if not isinstance(value, Tensor):
                raise CheckpointError(
                    f"{self.label}: value of {name!r} in {file} is a {type(value).__name__}, not a tensor"
                )
        return obj

    def _read(self, file: Path, name: str) -> Tensor:
        if file in self._held:
            return self._held[file][name]
        if self._current is None or self._current[0] != file or self._read_since_load > self._window:
            self._current = None  # drop the old mapping before making a new one
            self._current = (file, self._load(file))
            self._read_since_load = 0
        self._read_since_load += self.nbytes(name)
        return self._current[1][name]


def _read_index(index_path: Path, label: str) -> dict[str, Path]:
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"{label}: cannot read {index_path}: {error.strerror or one_line(error)}") from error
    except ValueError as error:
        raise CheckpointError(f"{label}: {index_path} is not valid JSON ({one_line(error)})") from error
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{label}: {index_path} has no \"weight_map\" of tensor name -> file name")
    folder = index_path.parent
    index = {name: folder / file for name, file in weight_map.items()}
    by_file: dict[Path, list[str]] = {}
    for name, file in index.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        if not file.is_file():
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise CheckpointError(
                f"{label}: shard {file.name} listed in {index_path.name} is missing "
                f"(it holds tensor {sorted(names)[0]!r}{more})"
            )
    return index


def _reader_for_index(index_path: Path, label: str, source_dir: Path | None) -> CheckpointReader:
    index = _read_index(index_path, label)
    files = sorted(set(index.values()))
    if all(file.name.endswith(".safetensors") for file in files):
        reader: CheckpointReader = SafetensorsReader(label, files, source_dir, index)
    elif all(file.suffix in TORCH_SUFFIXES for file in files):
        reader = TorchReader(label, files, source_dir, index)
    else:
        raise CheckpointError(f"{label}: {index_path.name} lists shards of unknown or mixed formats")
    reader.index_file = index_path
    return reader


def _find_in_folder(folder: Path, label: str) -> CheckpointReader:
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (TORCH_INDEX, TORCH_SINGLE)):
        if (folder / index_name).is_file():
            return _reader_for_index(folder / index_name, label, folder)
        if (folder / single_name).is_file():
            return _reader_for_file(folder / single_name, label, folder)
        suffix = Path(single_name).suffix
        indexes = sorted(folder.glob(f"*{suffix}.index.json"))
        if len(indexes) == 1:
            return _reader_for_index(indexes[0], label, folder)
        singles = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
        if len(singles) == 1 and not indexes:
            return _reader_for_file(singles[0], label, folder)
        if len(singles) > 1 or len(indexes) > 1:
            shown = ", ".join(p.name for p in (indexes or singles)[:4])
            raise CheckpointError(
                f"{label}: several {suffix} weight files and no {index_name} in {folder} ({shown}); "
                "pass the file or index to use"
            )
    others = sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".pth") and p.is_file())
    if len(others) == 1:
        return _reader_for_file(others[0], label, folder)
    raise CheckpointError(
        f"{label}: no model weights in {folder} (looked for {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
        f"{TORCH_SINGLE}, {TORCH_INDEX} or a single .safetensors/.bin/.pt file)"
    )


def _reader_for_file(file: Path, label: str, source_dir: Path | None) -> CheckpointReader:
    if file.name.endswith(".index.json"):
        return _reader_for_index(file, label, source_dir)
    if file.suffix == ".safetensors":
        return SafetensorsReader(label, [file], source_dir)
    if file.suffix in TORCH_SUFFIXES:
        return TorchReader(label, [file], source_dir)
    raise CheckpointError(
        f"{label}: {file} is neither a .safetensors file, a .pt/.pth/.bin state dict nor a *.index.json"
    )


def open_checkpoint(path: str | os.PathLike[str], label: str | None = None) -> CheckpointReader:
    """A reader for a model folder, a weights file or a shard index.

    Opens every file and reads every header (never the weights), so a missing
    shard, a truncated file or an unreadable path fails here, naming ``label``
    (default: the path as given).
    """
    path = Path(path)
    label = str(path) if label is None else label
    if not path.exists():
        hint = ""
        if not path.is_absolute() and len(path.parts) == 2 and not str(path).startswith("."):
            hint = " (models are read from local folders; download Hub models first, e.g. with `huggingface-cli download`)"
        raise CheckpointError(f"{label}: no such file or folder{hint}")
    if path.is_dir():
        try:
            return _find_in_folder(path, label)
        except PermissionError as error:
            raise CheckpointError(f"{label}: cannot list {path}: {error.strerror}") from error
    # A shard index stands for its folder (whose config.json is copied); a lone weights file does not.
    return _reader_for_file(path, label, path.parent if path.name.endswith(".index.json") else None)


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes of ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1.5GB"`` or a plain integer.

    KB/MB/GB are powers of 10 (as in ``transformers``), KiB/MiB/GiB powers of 2.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError  # pragma: no cover


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its name, shape and dtype, known before it exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Split ``specs`` (in order) into shards of at most ``max_shard_size``
    bytes of tensor data; a larger tensor gets a shard of its own."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards or [[]]


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The header (length prefix included) of a safetensors file holding
    ``specs`` back to back in this order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    offset = 0
    for spec in specs:
        if spec.dtype not in _SAFETENSORS_NAMES:
            raise CheckpointError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {
            "dtype": _SAFETENSORS_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # align the data on 8 bytes, as safetensors does
    return struct.pack("<Q", len(encoded)) + encoded


def _writeback_starter():
    """Linux's ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``
    from libc, as ``start(fd, offset, nbytes)``: starts writing a range of a
    file to disk without waiting for it. None elsewhere (then the closing fsync
    does all the waiting)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    sync_file_range_write = 2  # SYNC_FILE_RANGE_WRITE

    def start(descriptor: int, offset: int, length: int) -> None:
        function(descriptor, offset, length, sync_file_range_write)  # a hint: failures are left to the fsync

    return start


_start_writeback = _writeback_starter()


def _tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove temporary outputs for ``target`` left by killed merges.

    Only entries named ``.<target>.lowrank-merge-tmp-<pid>-*`` whose process is
    gone are removed (folders only if they carry the partial-output marker).
    """
    removed = []
    parent = target.parent
    prefix = f".{target.name}{_TMP_TAG}"
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        pid_text = entry[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        path = parent / entry
        if path.is_dir() and not path.is_symlink():
            if (path / _PARTIAL_MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        elif path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_output_is_not_an_input(target: Path, inputs: Iterable[Path]) -> None:
    """Fail on an output that is, or is a folder above, one of ``inputs``: the
    paths given, or the files they were opened from (a weights file inside an
    input's folder is that input too)."""
    resolved = target.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise CheckpointError(f"output {target} is (or contains) the input {source}; choose another --out")


def check_output_target(target: Path, *, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Fail early (before reading any model) on an output that exists without
    ``force``, that is one of the inputs, or whose parent is not a writable folder."""
    check_output_is_not_an_input(target, inputs)
    if target.exists() or target.is_symlink():
        if not force:
            raise CheckpointError(f"output {target} already exists; pass --force to replace it")
        if not (target.is_dir() or target.is_file()) or target.is_symlink():
            raise CheckpointError(f"output {target} exists and is not a plain file or folder; remove it first")
    parent = target.parent
    if not parent.exists():
        raise CheckpointError(f"cannot write {target}: folder {parent} does not exist")
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {target}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {target}: folder {parent} is not writable")


def _appears(path: Path, seconds: float = 30.0) -> bool:
    """Whether ``path`` is a file, waiting up to ``seconds`` for it: on a shared
    file system another machine's new file can take a moment to be visible."""
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class ShardedWriter:
    """Write planned tensors into safetensors shards, atomically.

    ``target`` ending in ``.safetensors`` gives one file; anything else gives a
    Hugging Face folder (``model.safetensors``, or ``model-0000k-of-0000N``
    shards with ``model.safetensors.index.json``) plus :meth:`add_file` extras.
    Use as a context manager: leaving it with an exception (or before
    :meth:`commit`) removes everything written.

    Several processes can write one folder output together (the distributed
    merge): each gets the same explicit ``shards`` plan and the indices of the
    shards it ``owned``. One of them creates the temporary folder
    (:meth:`start`), the others attach to it (``start(attach_to=...)``), each
    calls :meth:`finish_shards`, and once all have finished the creator alone
    calls :meth:`commit` (index over every shard, extra files, move into place).
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: Mapping[str, str] | None = None,
        force: bool = False,
        shards: Sequence[Sequence[TensorSpec]] | None = None,
        owned: Sequence[int] | None = None,
    ) -> None:
        self.target = Path(target)
        self.single_file = self.target.suffix == ".safetensors"
        self.force = force
        self.metadata = dict(metadata or {})
        if shards is None:
            self.shards = [list(specs)] if self.single_file else plan_shards(specs, max_shard_size)
        else:
            self.shards = [list(shard) for shard in shards] or [[]]
            if self.single_file or [spec for shard in self.shards for spec in shard] != list(specs):
                raise ValueError("an explicit shard plan needs a folder output and must hold exactly the specs, in order")
        names = [self.target.name] if self.single_file else shard_names(len(self.shards))
        self.shard_names = names
        self.owned = set(range(len(self.shards))) if owned is None else set(owned)
        self._order = [(i, spec) for i, shard in enumerate(self.shards) if i in self.owned for spec in shard]
        self._position = 0
        self._extra: dict[str, bytes | Path] = {}
        self._tmp: Path | None = None
        self._attached = False
        self._file = None
        self._written_back = 0  # the open shard's bytes whose write to disk was started
        self.committed = False

    # -- sizes ---------------------------------------------------------------

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data this writer writes (its own shards)."""
        return sum(spec.nbytes for _, spec in self._order)

    @property
    def temporary_path(self) -> Path | None:
        """The temporary output being written (None before :meth:`start` and after the end)."""
        return self._tmp

    def required_bytes(self) -> int:
        """Bytes of the whole output, every shard included: writers that share
        one output folder (the distributed merge) each need room for all of it."""
        tensor_bytes = sum(spec.nbytes for shard in self.shards for spec in shard)
        headers = sum(len(safetensors_header(shard, self.metadata)) for shard in self.shards)
        extra = sum(data.stat().st_size if isinstance(data, Path) else len(data) for data in self._extra.values())
        return tensor_bytes + headers + extra + 2**20

    def check_space(self) -> None:
        """Fail if the target's file system lacks room for the whole output."""
        try:
            free = shutil.disk_usage(self.target.parent).free
        except OSError as error:
            raise CheckpointError(f"cannot check free space for {self.target}: {one_line(error)}") from error
        needed = self.required_bytes()
        if free < needed:
            raise CheckpointError(
                f"not enough free disk space for {self.target}: the merge writes {format_size(needed)}, "
                f"{format_size(free)} are free in {self.target.parent}"
            )

    # -- life cycle ----------------------------------------------------------

    def __enter__(self) -> "ShardedWriter":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()

    def start(self, attach_to: Path | None = None) -> None:
        """Create the temporary output next to the target (checks that it is
        writable), or, with ``attach_to``, write into one another process started."""
        if attach_to is not None:
            if self.single_file or not _appears(attach_to / _PARTIAL_MARKER):
                raise CheckpointError(f"cannot attach to {attach_to}: not a partial output folder")
            self._tmp, self._attached = attach_to, True
            return
        remove_stale_partials(self.target)
        tmp = self.target.parent / f".{self.target.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            if self.single_file:
                tmp.touch(exist_ok=False)
                self._tmp = tmp
            else:
                tmp.mkdir()
                self._tmp = tmp
                (tmp / _PARTIAL_MARKER).write_text(f"{os.getpid()}\n", encoding="utf-8")
        except OSError as error:
            self.abort()
            raise CheckpointError(f"cannot write {self.target}: {error.strerror or one_line(error)}") from error

    def abort(self) -> None:
        """Remove everything written so far (an attached writer: its own shards;
        the temporary folder is the starter's to remove)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._tmp is not None and self._attached:
            for index in self.owned:
                (self._tmp / self.shard_names[index]).unlink(missing_ok=True)
            self._tmp = None
        if self._tmp is not None:
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            else:
                self._tmp.unlink(missing_ok=True)
            self._tmp = None

    # -- content ---------------------------------------------------------------

    def expected(self) -> TensorSpec | None:
        """The spec of the next tensor to :meth:`write` (None when all are written)."""
        return self._order[self._position][1] if self._position < len(self._order) else None

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next planned tensor (in plan order)."""
        if self._tmp is None:
            raise RuntimeError("ShardedWriter.write before start()")
        spec = self.expected()
        if spec is None or spec.name != name:
            raise RuntimeError(f"tensor {name!r} written out of order (expected {spec.name if spec else 'none'!r})")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, planned {spec.dtype} {list(spec.shape)}"
            )
        shard_index = self._order[self._position][0]
        try:
            if self._file is None:
                self._open_shard(shard_index)
            self._file.write(_tensor_bytes(tensor))
            self._write_back_written_bytes()
            self._position += 1
            if self._position == len(self._order) or self._order[self._position][0] != shard_index:
                self._close_shard()
        except OSError as error:
            raise CheckpointError(f"cannot write {self.target}: {error.strerror or one_line(error)}") from error

    def _shard_path(self, index: int) -> Path:
        return self._tmp if self.single_file else self._tmp / self.shard_names[index]

    def _write_back_written_bytes(self) -> None:
        """Once WRITEBACK_CHUNK bytes of the open shard await it, start their
        write to disk (without waiting): the disk writes while the next tensors
        are merged, and the fsync closing the shard waits for the last chunk
        only (benchmarks/NOTES.md, 2026-12-03, sixth session)."""
        written = self._file.tell()
        if _start_writeback is None or written - self._written_back < WRITEBACK_CHUNK:
            return
        self._file.flush()
        _start_writeback(self._file.fileno(), self._written_back, written - self._written_back)
        self._written_back = written

    def _open_shard(self, index: int) -> None:
        self._file = open(self._shard_path(index), "wb")
        self._written_back = 0
        self._file.write(safetensors_header(self.shards[index], self.metadata))

    def _close_shard(self) -> None:
        handle, self._file = self._file, None
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()

    def add_file(self, name: str, data: bytes | Path) -> None:
        """A small extra file for the output folder: its content, or a file
        to copy at :meth:`commit` (config, tokenizer, merge record)."""
        if self.single_file:
            raise RuntimeError("extra files need a folder output")
        if "/" in name or name.startswith(".") or name in self.shard_names or name == SAFETENSORS_INDEX:
            raise ValueError(f"cannot add file {name!r} to the output")
        self._extra[name] = data

    def finish_shards(self) -> None:
        """Check that every tensor of this writer's shards was written and give
        its empty shards (an empty model) their header."""
        if self._position != len(self._order):
            missing = self._order[self._position][1].name
            raise RuntimeError(f"commit before every tensor was written (next: {missing!r})")
        try:
            for index, shard in enumerate(self.shards):
                if not shard and index in self.owned and not self._shard_path(index).exists():
                    self._open_shard(index)
                    self._close_shard()
        except OSError as error:
            raise CheckpointError(f"cannot write {self.target}: {error.strerror or one_line(error)}") from error

    def commit(self) -> Path:
        """Finish the output and move it into place; returns the target. With
        several writers, only the one that started the output commits, after
        every writer's :meth:`finish_shards`."""
        if self._attached:
            raise RuntimeError("an attached writer does not commit; the writer that started the output does")
        self.finish_shards()
        try:
            if not self.single_file:
                if len(self.shards) > 1:
                    index = {
                        "metadata": {"total_size": sum(spec.nbytes for shard in self.shards for spec in shard)},
                        "weight_map": {spec.name: self.shard_names[i] for i, shard in enumerate(self.shards) for spec in shard},
                    }
                    self._extra[SAFETENSORS_INDEX] = (json.dumps(index, indent=2) + "\n").encode("utf-8")
                for name, data in self._extra.items():
                    if isinstance(data, Path):
                        shutil.copyfile(data, self._tmp / name)
                    else:
                        (self._tmp / name).write_bytes(data)
                (self._tmp / _PARTIAL_MARKER).unlink()
            self._move_into_place()
        except OSError as error:
            raise CheckpointError(f"cannot write {self.target}: {error.strerror or one_line(error)}") from error
        self.committed = True
        self._tmp = None
        return self.target

    def _move_into_place(self) -> None:
        target = self.target
        if not (target.exists() or target.is_symlink()):
            os.rename(self._tmp, target)
            return
        if not self.force:
            raise CheckpointError(f"output {target} appeared during the merge; nothing was replaced")
        old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(target, old)
        try:
            os.rename(self._tmp, target)
        except BaseException:  # an interrupt too: put the old output back
            os.rename(old, target)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def small_files_to_copy(folder: Path) -> list[Path]:
    """The first model's config, tokenizer and other small non-weight files
    (top level of the folder only; hidden files, model cards and weights excluded)."""
    chosen = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or not path.is_file() or name in SKIPPED_FILES:
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            continue
        if path.stat().st_size > MAX_COPIED_FILE_SIZE:
            continue
        chosen.append(path)
    return chosen
