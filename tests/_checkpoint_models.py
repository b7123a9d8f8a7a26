"""Tiny Hugging Face-style checkpoints on disk for the streaming and CLI tests."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from conftest import make_models

CONFIG = {"model_type": "tiny", "hidden_size": 8, "torch_dtype": "float32"}


def tiny_models(T: int = 3, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[dict[str, Tensor]]:
    """T small models (d = 8, two blocks) with odd shapes, int and bool buffers."""
    return make_models(T, 8, seed=seed, dtype=dtype, blocks=2)


def _split(names: Sequence[str], shards: int) -> list[list[str]]:
    size = -(-len(names) // shards)
    return [list(names[i : i + size]) for i in range(0, len(names), size)]


def save_model(
    folder: Path,
    state_dict: Mapping[str, Tensor],
    *,
    shards: int = 1,
    fmt: str = "safetensors",
    extras: bool = True,
) -> Path:
    """Save ``state_dict`` as a Hugging Face folder: ``model.safetensors`` (or
    ``pytorch_model.bin``), or ``shards`` files with an index; plus a config,
    a tokenizer file and a model card when ``extras``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(state_dict)
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"

    def save(tensors: dict[str, Tensor], path: Path) -> None:
        if fmt == "safetensors":
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    if shards == 1:
        save({n: state_dict[n].contiguous() for n in names}, folder / f"{stem}.{suffix}")
    else:
        parts = _split(names, shards)
        weight_map = {}
        for i, part in enumerate(parts, start=1):
            file = f"{stem}-{i:05d}-of-{len(parts):05d}.{suffix}"
            save({n: state_dict[n].contiguous() for n in part}, folder / file)
            weight_map.update({n: file for n in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index), encoding="utf-8")
    if extras:
        (folder / "config.json").write_text(json.dumps(CONFIG), encoding="utf-8")
        (folder / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")
        (folder / "README.md").write_text("# a fine-tuned model\n", encoding="utf-8")
    return folder


def save_models(root: Path, models: Sequence[Mapping[str, Tensor]], **kwargs) -> list[Path]:
    return [save_model(root / f"model_{i}", model, **kwargs) for i, model in enumerate(models)]


def load_output(path: Path) -> dict[str, Tensor]:
    """A merged output (folder with or without index, or a .safetensors file), in the stored order."""
    if path.is_file():
        return load_file(str(path))
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(path / "model.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"]
    result: dict[str, Tensor] = {}
    for file in sorted(set(weight_map.values())):
        result.update(load_file(str(path / file)))
    assert set(result) == set(weight_map)
    return result


def output_metadata(path: Path) -> dict[str, str]:
    file = path if path.is_file() else sorted(path.glob("*.safetensors"))[0]
    with safe_open(str(file), framework="pt") as handle:
        return handle.metadata()


def assert_same_state(got: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Same keys, dtypes, shapes and bit-identical values."""
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def leftovers(root: Path) -> list[str]:
    """Temporary merge outputs under ``root`` (there should be none)."""
    return sorted(p.name for p in root.iterdir() if ".lowrank-merge-" in p.name)
