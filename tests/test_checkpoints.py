"""Checkpoint readers, the sharded writer and the streaming merge (in process)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowrank_merge as lm
from lowrank_merge import checkpoints
from lowrank_merge.checkpoints import (
    CheckpointError,
    SafetensorsReader,
    ShardedWriter,
    TensorSpec,
    TorchReader,
    open_checkpoint,
    parse_size,
    plan_shards,
    remove_stale_partials,
)
from lowrank_merge.config import ConfigError, MergeConfig, load_config, merge_record, parse_config
from lowrank_merge.streaming import group_pattern, inspect_plan, iterate_layers, merge_checkpoints, open_models
from lowrank_merge.validation import TensorMeta

from _checkpoint_models import assert_same_state, leftovers, load_output, output_metadata, save_model, save_models, tiny_models


@pytest.fixture(scope="module")
def models():
    return tiny_models(3)


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shards, fmt", [(1, "safetensors"), (3, "safetensors"), (1, "bin"), (2, "bin")])
def test_reader_reads_every_layout(tmp_path, models, shards, fmt):
    folder = save_model(tmp_path / "m", models[0], shards=shards, fmt=fmt)
    reader = open_checkpoint(folder)
    assert isinstance(reader, SafetensorsReader if fmt == "safetensors" else TorchReader)
    assert len(reader.files) == shards
    assert reader.source_dir == folder
    metas = reader.metas()
    assert set(metas) == set(models[0])
    for name, tensor in models[0].items():
        assert metas[name] == TensorMeta.of(tensor)
        assert torch.equal(reader.read(name), tensor)


def test_reader_walks_tensors_in_file_order(tmp_path, models):
    folder = save_model(tmp_path / "m", models[0], shards=2)
    reader = open_checkpoint(folder)
    header_order = []
    for file in reader.files:
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        header_order += sorted(header, key=lambda name: header[name]["data_offsets"][0])
    assert reader.names() == header_order


def test_safetensors_byte_ranges_are_each_tensors_bytes(tmp_path, models):
    """What ``will_need`` asks the kernel to read ahead is exactly each tensor's data."""
    folder = save_model(tmp_path / "m", models[0], shards=2)
    reader = open_checkpoint(folder)
    for name, tensor in models[0].items():
        start, length = reader._byte_ranges[name]
        with open(reader._locations[name], "rb") as handle:
            handle.seek(start)
            data = handle.read(length)
        assert data == tensor.contiguous().flatten().view(torch.uint8).numpy().tobytes(), name
        assert reader.will_need(name) is None


def test_will_need_is_only_a_hint(tmp_path, models):
    """A vanished file or a reader without byte ranges: nothing raised; read() reports."""
    folder = save_model(tmp_path / "m", models[0], shards=1)
    reader = open_checkpoint(folder)
    name = next(iter(models[0]))
    reader.files[0].unlink()
    reader.will_need(name)
    with pytest.raises(CheckpointError, match=name):
        reader.read(name)
    torch_reader = open_checkpoint(save_model(tmp_path / "t", models[0], shards=1, fmt="bin"))
    torch_reader.will_need(name)


@pytest.mark.parametrize("prefetch", [False, True])
def test_layers_ask_for_the_next_tensor_before_reading_the_current(tmp_path, models, monkeypatch, prefetch):
    readers = open_models(save_models(tmp_path, models[:2])).readers
    names = readers[0].names()[:3]
    events = []
    real_read = SafetensorsReader.read
    monkeypatch.setattr(SafetensorsReader, "will_need", lambda self, name: events.append(("ahead", self.label, name)))
    monkeypatch.setattr(SafetensorsReader, "read", lambda self, name: events.append(("read", self.label, name)) or real_read(self, name))
    for name, tensors in iterate_layers(readers, names, torch.device("cpu"), prefetch):
        assert torch.equal(tensors[1], models[1][name])
    labels = [reader.label for reader in readers]
    expected = []
    for position, name in enumerate(names):
        if position + 1 < len(names):
            expected += [("ahead", label, names[position + 1]) for label in labels]
        expected += [("read", label, name) for label in labels]
    assert events == expected


def test_single_files_and_wrapped_state_dicts(tmp_path, models):
    model = models[1]
    save_file({n: t.contiguous() for n, t in model.items()}, str(tmp_path / "w.safetensors"))
    torch.save(model, tmp_path / "w.pt")
    torch.save({"state_dict": model, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save(model, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for file in ("w.safetensors", "w.pt", "wrapped.pth", "legacy.bin"):
        reader = open_checkpoint(tmp_path / file)
        assert reader.source_dir is None
        assert reader.label == str(tmp_path / file)
        assert_same_state({n: reader.read(n) for n in reader.names()}, model)


def test_torch_reader_remaps_in_windows(tmp_path, models, monkeypatch):
    torch.save(models[0], tmp_path / "w.bin")
    monkeypatch.setattr(TorchReader, "window_factor", 0)  # re-map before every read
    reader = open_checkpoint(tmp_path / "w.bin")
    assert_same_state({n: reader.read(n) for n in reader.names()}, models[0])


def test_weights_only_refuses_pickled_objects(tmp_path):
    torch.save({"w": torch.zeros(2), "fn": TensorSpec("x", (1,), torch.float32)}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match=r"obj\.pt.*weights_only=True"):
        open_checkpoint(tmp_path / "obj.pt")


def test_tensors_come_in_file_order_with_ties_by_name(tmp_path):
    """Empty tensors share their offset with the next tensor; safetensors orders
    such ties at random, the reader by name."""
    tensors = {f"empty_{c}": torch.zeros(0, 3) for c in "qbzak"} | {"w": torch.ones(2, 2), "b": torch.ones(3)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with open(tmp_path / "m.safetensors", "rb") as handle:
        header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
    expected = sorted(tensors, key=lambda name: (header[name]["data_offsets"][0], name))
    for _ in range(5):
        assert open_checkpoint(tmp_path / "m.safetensors").names() == expected


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_torch_file_is_named_and_explained(tmp_path, models, damage):
    """torch.load says ``OSError: Invalid argument`` for a truncated zip and
    ``KeyError: 101`` for garbage: the error says what that means."""
    torch.save(models[0], tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"hello world" * 10)
    expected = r"w\.pt is not a readable torch checkpoint: truncated, corrupt, or not written by torch\.save \(torch\.load: "
    with pytest.raises(CheckpointError, match=expected):
        open_checkpoint(tmp_path / "w.pt", label="model 2")


def test_missing_shard_names_model_and_file(tmp_path, models):
    folder = save_model(tmp_path / "m", models[0], shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"m: shard model-00002-of-00003\.safetensors listed in .* is missing"):
        open_checkpoint(folder)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path, models):
    folder = save_model(tmp_path / "m", models[0], shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost.weight' is listed in the index"):
        open_checkpoint(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, models, damage):
    folder = save_model(tmp_path / "m", models[0])
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[:-50], "garbage": b"\x07" * 64 + data[64:], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors file"):
        open_checkpoint(folder)


def test_folders_without_usable_weights(tmp_path, models):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights in"):
        open_checkpoint(tmp_path / "empty")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(2)}, str(two / name))
    with pytest.raises(CheckpointError, match="several .safetensors weight files"):
        open_checkpoint(two)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="neither a .safetensors file"):
        open_checkpoint(tmp_path / "notes.txt")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size("4096") == 4096
    for bad in ("", "5 parsecs", "-3MB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------


def _specs(state):
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state.items()]


def test_plan_shards_respects_the_limit():
    specs = [TensorSpec(f"t{i}", (size,), torch.float32) for i, size in enumerate([10, 10, 30, 5, 5, 5])]
    shards = plan_shards(specs, 80)  # bytes: 40, 40, 120, 20, 20, 20
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert plan_shards([], 10) == [[]]


def test_writer_round_trip_sharded(tmp_path, models):
    state = models[0]
    with ShardedWriter(tmp_path / "out", _specs(state), max_shard_size=2000, metadata={"k": "v"}) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.add_file("extra.txt", b"hello")
        writer.commit()
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors.index.json" in files and "extra.txt" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert_same_state(load_output(tmp_path / "out"), state)
    assert output_metadata(tmp_path / "out") == {"k": "v"}
    assert leftovers(tmp_path) == []


def test_writer_single_file_and_empty_model(tmp_path, models):
    with ShardedWriter(tmp_path / "one.safetensors", _specs(models[0])) as writer:
        for name, tensor in models[0].items():
            writer.write(name, tensor)
        writer.commit()
    assert_same_state(load_file(str(tmp_path / "one.safetensors")), models[0])
    with ShardedWriter(tmp_path / "empty", []) as writer:
        writer.commit()
    assert load_file(str(tmp_path / "empty" / "model.safetensors")) == {}


@pytest.mark.parametrize("chunk", [1, 1000, 10**9])
def test_writer_starts_writing_each_chunk_to_disk_as_it_goes(tmp_path, models, monkeypatch, chunk):
    """Every WRITEBACK_CHUNK of a shard is handed to the kernel's write-back in
    order (each byte once, from the shard's start) while later tensors are still
    to come; the output is the same as without write-back."""
    state = models[0]
    started = []
    real_start = checkpoints._start_writeback

    def start(descriptor, offset, length):
        started.append((os.readlink(f"/proc/self/fd/{descriptor}"), offset, length, os.fstat(descriptor).st_size))
        if real_start is not None:
            real_start(descriptor, offset, length)

    monkeypatch.setattr(checkpoints, "WRITEBACK_CHUNK", chunk)
    monkeypatch.setattr(checkpoints, "_start_writeback", start)
    with ShardedWriter(tmp_path / "out", _specs(state), max_shard_size=2000) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
        writer.commit()
    assert_same_state(load_output(tmp_path / "out"), state)
    by_shard = {}
    for path, offset, length, size_then in started:
        assert length >= chunk and offset + length <= size_then  # only bytes already in the file
        by_shard.setdefault(os.path.basename(path), []).append((offset, length))
    if chunk == 10**9:
        assert started == []
        return
    shards = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert sorted(by_shard) == shards
    for ranges in by_shard.values():
        assert ranges[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    if chunk == 1:  # after every tensor: each range ends where a tensor's bytes end
        assert len(started) == len(state)


def test_writer_without_write_back_writes_the_same(tmp_path, models, monkeypatch):
    monkeypatch.setattr(checkpoints, "_start_writeback", None)
    monkeypatch.setattr(checkpoints, "WRITEBACK_CHUNK", 1)
    with ShardedWriter(tmp_path / "one.safetensors", _specs(models[0])) as writer:
        for name, tensor in models[0].items():
            writer.write(name, tensor)
        writer.commit()
    assert_same_state(load_file(str(tmp_path / "one.safetensors")), models[0])


def test_writer_removes_everything_on_error(tmp_path, models):
    state = models[0]
    with pytest.raises(KeyError):
        with ShardedWriter(tmp_path / "out", _specs(state), max_shard_size=1000) as writer:
            for position, (name, tensor) in enumerate(state.items()):
                writer.write(name, tensor)
                if position == 10:
                    raise KeyError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_checks_order_and_layout(tmp_path, models):
    names = list(models[0])
    with ShardedWriter(tmp_path / "out", _specs(models[0])) as writer:
        with pytest.raises(RuntimeError, match="out of order"):
            writer.write(names[1], models[0][names[1]])
        with pytest.raises(RuntimeError, match="planned"):
            writer.write(names[0], models[0][names[0]].double() if models[0][names[0]].is_floating_point() else torch.zeros(7))
        with pytest.raises(RuntimeError, match="before every tensor"):
            writer.commit()
    assert os.listdir(tmp_path) == []


def test_writer_force_replaces_and_refuses_otherwise(tmp_path, models):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    writer = ShardedWriter(target, _specs(models[0]))
    with writer:
        for name, tensor in models[0].items():
            writer.write(name, tensor)
        with pytest.raises(CheckpointError, match="appeared during the merge"):
            writer.commit()
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == ["old.txt"]
    with ShardedWriter(target, _specs(models[0]), force=True) as writer:
        for name, tensor in models[0].items():
            writer.write(name, tensor)
        writer.commit()
    assert os.listdir(tmp_path) == ["out"] and sorted(os.listdir(target)) == ["model.safetensors"]


def test_stale_partial_outputs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.lowrank-merge-tmp-{dead.pid}-abcd"
    stale.mkdir()
    (stale / ".lowrank-merge-partial").write_text("x")
    live = tmp_path / f".out.lowrank-merge-tmp-{os.getpid()}-abcd"
    live.mkdir()
    (live / ".lowrank-merge-partial").write_text("x")
    unmarked = tmp_path / f".out.lowrank-merge-tmp-{dead.pid}-ffff"
    unmarked.mkdir()
    assert remove_stale_partials(tmp_path / "out") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unmarked.name])


# ---------------------------------------------------------------------------
# Streaming merge
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("prefetch", [False, True])
def test_merge_checkpoints_equals_cart_merge(tmp_path, models, prefetch):
    paths = save_models(tmp_path, models, shards=2)
    settings = lm.method_settings("cart", rank=2, scale=1.5)
    result = merge_checkpoints(paths, tmp_path / "out", settings, max_shard_size=3000, prefetch=prefetch)
    assert result.tensors == len(models[0])
    assert_same_state(load_output(tmp_path / "out"), lm.cart_merge(models, rank=2, scale=1.5))
    assert leftovers(tmp_path) == []


def test_mixed_input_formats(tmp_path, models):
    a = save_model(tmp_path / "a", models[0], shards=2)
    b = save_model(tmp_path / "b", models[1], fmt="bin", shards=2, extras=False)
    torch.save(models[2], tmp_path / "c.pt")
    merge_checkpoints([a, b, tmp_path / "c.pt"], tmp_path / "out.safetensors", lm.method_settings("cart", svd="exact"))
    assert_same_state(load_file(str(tmp_path / "out.safetensors")), lm.cart_merge(models, svd="exact"))


def test_base_model_is_checked_and_recorded(tmp_path, models):
    paths = save_models(tmp_path, models)
    base = save_model(tmp_path / "base", tiny_models(1, seed=9)[0])
    merge_checkpoints(paths, tmp_path / "out", base=base)
    record = json.loads(output_metadata(tmp_path / "out")["merge_config"])
    assert record["base_model"] == str(base)
    assert [m["model"] for m in record["models"]] == [str(p) for p in paths]
    assert_same_state(load_output(tmp_path / "out"), lm.cart_merge(models))
    bad = dict(tiny_models(1, seed=9)[0])
    bad["head.weight"] = torch.zeros(6, 8)
    bad_base = save_model(tmp_path / "bad_base", bad)
    with pytest.raises(ValueError, match=r"'head.weight' has shape \[6, 8\] in base model .*bad_base"):
        merge_checkpoints(paths, tmp_path / "out2", base=bad_base)
    assert not (tmp_path / "out2").exists()


def test_checks_run_before_any_decomposition(tmp_path, models, forbid_decomposition):
    paths = save_models(tmp_path, models)
    broken = dict(models[2])
    del broken["blocks.1.mlp.c_fc.weight"]
    paths[2] = save_model(tmp_path / "broken", broken)
    with pytest.raises(ValueError, match=r"broken lacks \['blocks.1.mlp.c_fc.weight'\]"):
        merge_checkpoints(paths, tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_out_dtype_updates_config(tmp_path, models):
    paths = save_models(tmp_path, models)
    merge_checkpoints(paths, tmp_path / "out", lm.method_settings("cart", out_dtype=torch.bfloat16))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    merged = load_output(tmp_path / "out")
    assert merged["head.weight"].dtype == torch.bfloat16 and merged["position_ids"].dtype == torch.int64
    assert not (tmp_path / "out" / "README.md").exists()  # the first model's card is not the merge's


def test_inspect_plan_groups_layers(tmp_path, models):
    inputs = open_models(save_models(tmp_path, models))
    groups = inspect_plan(inputs, lm.MergeSettings.create(rank_ratio=0.5))
    by_pattern = {g.pattern: g for g in groups}
    fc = by_pattern["blocks.*.mlp.c_fc.weight"]
    assert (fc.count, fc.action, fc.shape, fc.rank) == (2, "low_rank", (32, 8), 4)
    assert by_pattern["position_ids"].action == "copy"
    assert sum(g.count for g in groups) == len(models[0])
    assert group_pattern("model.layers.12.mlp.up_proj.weight") == "model.layers.*.mlp.up_proj.weight"


# ---------------------------------------------------------------------------
# Config schema
# ---------------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    settings = lm.method_settings(
        "cart", rank=3, scale=1.25, svd="krylov", out_dtype=torch.float16, **lm.key_preset("reference")
    )
    record = merge_record(["a", "b"], "base", settings)
    again = parse_config(record).settings()
    assert again == settings


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "dare"}, "merge_method 'dare' is not supported; supported methods: cart, average"),
        ({"tokenizer_source": "base"}, "unknown key 'tokenizer_source'"),
        ({"parameters": {"density": 0.5}}, "merge method 'cart' takes no parameter 'density'; its parameters: rank_ratio"),
        ({"parameters": {"rank": 4, "rank_ratio": 0.1}}, "either parameters.rank or parameters.rank_ratio"),
        ({"models": [{"model": "a", "parameters": {"weight": 1}}]}, "per-model parameters are not supported"),
        ({"models": []}, "models must be a non-empty list"),
        ({"dtype": "bfloat16"}, "dtype .* must be float32 or float64"),
    ],
)
def test_config_errors(change, message):
    data = {"merge_method": "cart", "models": ["a", "b"], "parameters": {"scale": 1.0}} | change
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "merge.yaml").settings()


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "merge_method: cart\nmodels:\n  - model: a\n  - b\nbase_model: base\n"
        "parameters:\n  rank_ratio: 0.2\n  scale: 1.5\n  preset: reference\n"
    )
    config = load_config(path)
    assert config == MergeConfig(["a", "b"], "base", {"rank_ratio": 0.2, "scale": 1.5, "preset": "reference"})
    settings = config.with_overrides(parameters={"rank": 7, "scale": None}).settings().compute
    assert (settings.rank, settings.scale) == (7, 1.5)
    assert [p.pattern for p in settings.key_filter.include] == list(lm.REFERENCE_INCLUDE)
    path.write_text(
        "merge_method: cart\nmodels: [a, b]\nparameters:\n  include: [attn]\n  exclude: [bias]\n  rank: 3\n"
    )
    config = load_config(path)
    # A preset on the command line replaces the config's whole key filter; a pattern replaces its own key.
    key_filter = config.with_overrides(parameters={"preset": "all"}).settings().compute.key_filter
    assert key_filter.include is None and key_filter.exclude == ()
    key_filter = config.with_overrides(parameters={"exclude": ["norm"]}).settings().compute.key_filter
    assert [p.pattern for p in key_filter.include] == ["attn"] and [p.pattern for p in key_filter.exclude] == ["norm"]
    path.write_text("merge_method: cart\nmodels: [a\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
