"""The ``lowrank-merge`` command line: merges equal ``cart_merge``, every bad
input fails early with one clear line and leaves nothing behind, and an
interrupted merge leaves no output folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import lowrank_merge as lm
from lowrank_merge import cli

from _checkpoint_models import (
    CONFIG,
    assert_same_state,
    leftovers,
    load_output,
    output_metadata,
    save_model,
    save_models,
    tiny_models,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fp32_models():
    return tiny_models(3)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, fp32_models):
    """Three sharded fp32 Hugging Face folders (built once, never modified)."""
    return save_models(tmp_path_factory.mktemp("sharded"), fp32_models, shards=3)


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------
# Merges equal cart_merge
# ---------------------------------------------------------------------------


def test_merge_sharded_fp32(tmp_path, sharded, fp32_models, capsys):
    out = tmp_path / "merged"
    code, _, err = run(["merge", *sharded, "--out", out, "--max-shard-size", "3KB", "--rank", "2", "--scale", "1.5"], capsys)
    assert code == 0, err
    assert_same_state(load_output(out), lm.cart_merge(fp32_models, rank=2, scale=1.5))
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    assert {"model.safetensors.index.json", "config.json", "tokenizer.json", "merge_config.yaml"} <= set(files)
    assert json.loads((out / "config.json").read_text()) == CONFIG
    record = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert record["merge_method"] == "cart" and record["parameters"]["rank"] == 2
    assert record["models"] == [{"model": str(p)} for p in sharded]
    assert record["lowrank_merge_version"] == lm.__version__
    metadata = output_metadata(out)
    assert metadata["format"] == "pt" and metadata["merge_method"] == "cart"
    assert json.loads(metadata["merge_config"]) == record
    assert "merged 3 models into" in err and leftovers(tmp_path) == []


def test_merge_single_file_bf16(tmp_path, capsys):
    models = tiny_models(2, dtype=torch.bfloat16, seed=3)
    paths = save_models(tmp_path, models)  # model.safetensors each
    out = tmp_path / "merged"
    code, _, err = run(["merge", *paths, "--out", out, "--rank-ratio", "0.3", "--quiet"], capsys)
    assert code == 0 and err == ""
    assert sorted(os.listdir(out)) == ["config.json", "merge_config.yaml", "model.safetensors", "tokenizer.json"]
    merged = load_output(out)
    assert merged["head.weight"].dtype == torch.bfloat16
    assert_same_state(merged, lm.cart_merge(models, rank_ratio=0.3))


def test_a_shard_index_stands_for_its_folder(tmp_path, sharded, fp32_models, capsys):
    """Given as its index file, a sharded model's folder still gives the output its config."""
    out = tmp_path / "merged"
    index = sharded[0] / "model.safetensors.index.json"
    code, _, err = run(["merge", index, *sharded[1:], "--out", out, "--rank", "2", "-q"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text()) == CONFIG
    assert_same_state(load_output(out), lm.cart_merge(fp32_models, rank=2))


def test_merge_into_one_safetensors_file_with_options(tmp_path, sharded, fp32_models, capsys):
    out = tmp_path / "merged.safetensors"
    argv = ["merge", *sharded, "-o", out, "--preset", "reference", "--svd", "krylov", "--niter", "1", "--seed", "5"]
    argv += ["--dtype", "float64", "--out-dtype", "bfloat16", "--device", "cpu", "-q"]
    assert run(argv, capsys)[0] == 0
    expected = lm.cart_merge(
        fp32_models, svd="krylov", niter=1, seed=5, compute_dtype=torch.float64, out_dtype=torch.bfloat16, **lm.key_preset("reference")
    )
    assert_same_state(load_output(out), expected)
    assert os.listdir(tmp_path) == ["merged.safetensors"]


def test_include_and_exclude(tmp_path, sharded, fp32_models, capsys):
    out = tmp_path / "merged"
    argv = ["merge", *sharded, "--out", out, "--include", "mlp", "attn", "--exclude", "bias", "c_proj", "-q"]
    assert run(argv, capsys)[0] == 0
    expected = lm.cart_merge(fp32_models, include=["mlp", "attn"], exclude=["bias", "c_proj"])
    assert_same_state(load_output(out), expected)


def test_yaml_config(tmp_path, sharded, fp32_models, capsys):
    config = tmp_path / "merge.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            merge_method: cart
            models:
              - model: {sharded[0]}
              - model: {sharded[1]}
              - {sharded[2]}
            base_model: {sharded[0]}
            parameters:
              rank_ratio: 0.25
              scale: 1.2
              svd: exact
            dtype: float32
            out_dtype: float16
            """
        )
    )
    out = tmp_path / "merged"
    code, _, err = run(["merge", "--config", config, out, "--scale", "0.5", "-q"], capsys)  # the command line wins
    assert code == 0, err
    expected = lm.cart_merge(fp32_models, rank_ratio=0.25, scale=0.5, svd="exact", out_dtype=torch.float16)
    assert_same_state(load_output(out), expected)
    # The recorded merge_config.yaml is itself a config that reproduces the merge.
    again = tmp_path / "again"
    assert run(["merge", "--config", out / "merge_config.yaml", again, "-q"], capsys)[0] == 0
    assert_same_state(load_output(again), expected)


def test_inspect(sharded, capsys):
    code, out, _ = run(["inspect", *sharded, "--rank-ratio", "0.5"], capsys)
    assert code == 0
    assert "3 models, compatible: 37 tensors" in out
    line = next(row for row in out.splitlines() if row.startswith("blocks.*.mlp.c_fc.weight "))
    assert line.split()[1:6] == ["2", "32x8", "float32", "low-rank", "4"]
    assert next(row for row in out.splitlines() if row.startswith("position_ids")).split()[4] == "copy"
    assert "total: 37 tensors (13 low-ranked, 21 averaged, 3 copied)" in out
    assert "FLOP of work" in out


def test_progress_bar_only_when_asked(tmp_path, sharded, capsys):
    code, _, err = run(["merge", *sharded, "--out", tmp_path / "a"], capsys)
    assert code == 0 and "cart merge" not in err  # stderr is not a terminal here
    code, _, err = run(["merge", *sharded, "--out", tmp_path / "b", "--progress"], capsys)
    assert code == 0 and "cart merge 37/37" in err and "B/s]" in err


# ---------------------------------------------------------------------------
# Bad inputs: a clear line, a non-zero status, no output
# ---------------------------------------------------------------------------


def _break(kind, tmp_path, models):
    """Inputs and output for one kind of bad input; returns (argv, expected message regex)."""
    paths = save_models(tmp_path / "in", models, shards=2)
    out = tmp_path / "out"
    if kind == "missing shard":
        (paths[1] / "model-00002-of-00002.safetensors").unlink()
        return [*paths, "--out", out], r"model_1: shard model-00002-of-00002\.safetensors listed in model\.safetensors\.index\.json is missing"
    if kind == "missing key":
        broken = dict(models[2])
        del broken["blocks.0.attn.out_proj.weight"]
        shutil.rmtree(paths[2])
        save_model(paths[2], broken, shards=2)
        return [*paths, "--out", out], r"model_2 lacks \['blocks\.0\.attn\.out_proj\.weight'\] found in .*model_0"
    if kind == "shape mismatch":
        broken = dict(models[1])
        broken["head.weight"] = torch.zeros(4, 8)
        shutil.rmtree(paths[1])
        save_model(paths[1], broken)
        return [*paths, "--out", out], r"tensor 'head\.weight' has shape \[4, 8\] in .*model_1 but \[5, 8\] in .*model_0"
    if kind == "corrupt file":
        shard = paths[2] / "model-00001-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:-16])
        return [*paths, "--out", out], r"model_2: .*model-00001-of-00002\.safetensors is not a valid safetensors file"
    if kind == "existing output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        return [*paths, "--out", out], r"output .*out already exists; pass --force to replace it"
    if kind == "output under a file":
        (tmp_path / "file").write_text("x")
        return [*paths, "--out", tmp_path / "file" / "out"], r"cannot write .*: .*file is not a folder"
    if kind == "output parent missing":
        return [*paths, "--out", tmp_path / "no" / "out"], r"cannot write .*: folder .*no does not exist"
    if kind == "missing model":
        return [*paths, tmp_path / "in" / "model_9", "--out", out], r"model_9: no such file or folder"
    if kind == "nan values":
        broken = dict(models[1])
        broken["blocks.1.mlp.c_fc.weight"] = broken["blocks.1.mlp.c_fc.weight"].clone()
        broken["blocks.1.mlp.c_fc.weight"][3, 2] = float("nan")
        shutil.rmtree(paths[1])
        save_model(paths[1], broken, shards=2)
        return [*paths, "--out", out], r"tensor 'blocks\.1\.mlp\.c_fc\.weight' of .*model_1 contains NaN values"
    if kind == "nan values in the base":
        base = dict(models[0])
        base["blocks.0.mlp.c_fc.bias"] = torch.full_like(base["blocks.0.mlp.c_fc.bias"], float("nan"))
        base_path = save_model(tmp_path / "in" / "base", base)
        argv = [*paths, "--method", "task_arithmetic", "--base", base_path, "--out", out]
        return argv, r"tensor 'blocks\.0\.mlp\.c_fc\.bias' of base model .*in/base contains NaN values"
    if kind == "output is an input":
        return [*paths, "--out", paths[0], "--force"], r"output .*model_0 is \(or contains\) the input"
    if kind == "output is a shard of an input":
        shard = paths[1] / "model-00002-of-00002.safetensors"
        return [*paths, "--out", shard, "--force"], r"output .*model_1/model-00002-of-00002\.safetensors is \(or contains\) the input"
    if kind == "output is the index of an input":
        index = paths[2] / "model.safetensors.index.json"
        return [*paths, "--out", index, "--force"], r"output .*model_2/model\.safetensors\.index\.json is \(or contains\) the input"
    raise AssertionError(kind)


BAD_INPUTS = [
    "missing shard",
    "missing key",
    "shape mismatch",
    "corrupt file",
    "existing output",
    "output under a file",
    "output parent missing",
    "missing model",
    "nan values",
    "nan values in the base",
    "output is an input",
    "output is a shard of an input",
    "output is the index of an input",
]


def _file_contents(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_inputs(kind, tmp_path, fp32_models, capsys):
    argv, message = _break(kind, tmp_path, fp32_models)
    before = sorted(os.listdir(tmp_path))
    inputs_before = _file_contents(tmp_path / "in")
    code, out, err = run(["merge", *argv, "-q"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowrank-merge: error: "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # no output folder, no temporary left behind
    assert _file_contents(tmp_path / "in") == inputs_before  # no input touched
    if kind == "existing output":
        assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_inspect_reports_incompatible_models(tmp_path, fp32_models, capsys):
    argv, message = _break("shape mismatch", tmp_path, fp32_models)
    code, out, err = run(["inspect", *argv[:3]], capsys)
    assert code == 1 and out == "" and "has shape [4, 8]" in err


def test_non_writable_output_folder(tmp_path, sharded, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run(["merge", *sharded, "--out", locked / "out"], capsys)
    finally:
        locked.chmod(0o700)
    assert code == 1 and "is not writable" in err and os.listdir(locked) == []


def test_output_folder_that_refuses_writes(tmp_path, sharded, capsys, monkeypatch):
    """What a non-writable folder does for a non-root user, simulated so that it runs as root too."""
    import lowrank_merge.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints.os, "access", lambda path, mode: False)
    code, _, err = run(["merge", *sharded, "--out", tmp_path / "out"], capsys)
    assert code == 1 and f"folder {tmp_path} is not writable" in err
    monkeypatch.undo()

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    code, _, err = run(["merge", *sharded, "--out", tmp_path / "out"], capsys)
    assert code == 1 and "cannot write" in err and "Permission denied" in err
    assert os.listdir(tmp_path) == []


def test_not_enough_disk_space(tmp_path, sharded, capsys, monkeypatch, forbid_decomposition):
    import lowrank_merge.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    code, _, err = run(["merge", *sharded, "--out", tmp_path / "out"], capsys)
    assert code == 1 and "not enough free disk space" in err
    assert os.listdir(tmp_path) == []


def test_verbose_prints_the_traceback(tmp_path, sharded, capsys):
    code, _, err = run(["merge", *sharded, tmp_path / "nowhere", "--out", tmp_path / "out", "--verbose"], capsys)
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("lowrank-merge: error:")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["merge", "a", "b"], "no output given"),
        (["merge", "--out", "x"], "no models given"),
        (["merge", "a", "--out", "x", "--rank", "2", "--rank-ratio", "0.1"], "not allowed with argument"),
        (["merge", "a", "--out", "x", "--max-shard-size", "lots"], "cannot read size"),
        (["merge", "a", "--out", "x", "--svd", "magic"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err


def test_bad_parameters_and_config(tmp_path, sharded, capsys):
    code, _, err = run(["merge", *sharded, "--out", tmp_path / "o", "--rank-ratio", "1.5"], capsys)
    assert code == 1 and "rank_ratio must be in (0, 1]" in err
    config = tmp_path / "dare.yaml"
    config.write_text(f"merge_method: dare\nmodels: [{sharded[0]}, {sharded[1]}]\n")
    code, _, err = run(["merge", "--config", config, tmp_path / "o"], capsys)
    assert code == 1 and "supported methods: cart, average, task_arithmetic, ties" in err
    config.write_text(f"merge_method: cart\nmodels: [{sharded[0]}]\nslices: []\n")
    code, _, err = run(["merge", "--config", config, tmp_path / "o"], capsys)
    assert code == 1 and "unknown key 'slices'" in err
    config.write_text(f"merge_method: cart\nmodels: [{sharded[0]}]\n")
    code, _, err = run(["merge", "--config", config, sharded[0], tmp_path / "o"], capsys)
    assert code == 2 and "models come from --config; give only the output folder on the command line" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run(["inspect", "--config", config, sharded[1]], capsys)
    assert code == 2 and "models come from --config; give no model paths with it" in err


def test_force_replaces_an_existing_output(tmp_path, sharded, fp32_models, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run(["merge", *sharded, "--out", out, "--force", "-q"], capsys)[0] == 0
    assert "stale.txt" not in os.listdir(out)
    assert_same_state(load_output(out), lm.cart_merge(fp32_models))
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------------
# Subprocesses: the console script, python -m, interruption
# ---------------------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def test_console_script_and_module(tmp_path, sharded, fp32_models):
    script = Path(sys.executable).with_name("lowrank-merge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lowrank_merge"]
    out = tmp_path / "out"
    done = subprocess.run([*command, "merge", *map(str, sharded), "--out", str(out)], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert_same_state(load_output(out), lm.cart_merge(fp32_models))
    bad = subprocess.run(
        [sys.executable, "-m", "lowrank_merge", "inspect", str(sharded[0]), str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "no such file or folder" in bad.stderr


SLOW_MERGE = """
import signal, sys, time
import lowrank_merge.streaming as streaming
from lowrank_merge.cli import main

# Ctrl-C raises KeyboardInterrupt, as in a foreground shell: a test run from a
# background job would otherwise inherit SIGINT as ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

merge_method_tensor = streaming.merge_method_tensor

def slow_merge_tensor(*args, **kwargs):
    print("MERGING", flush=True)
    time.sleep(0.2)
    return merge_method_tensor(*args, **kwargs)

streaming.merge_method_tensor = slow_merge_tensor
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupted_merge_leaves_no_output(tmp_path, sharded, sig, capsys):
    out = tmp_path / "out"
    argv = ["merge", *map(str, sharded), "--out", str(out), "--max-shard-size", "2KB"]
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    try:
        for _ in range(5):  # a few tensors in: shards are being written
            assert process.stdout.readline() == "MERGING\n"
        partial = leftovers(tmp_path)
        assert len(partial) == 1 and any((tmp_path / partial[0]).iterdir())
        process.send_signal(sig)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode != 0
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert "interrupted; no output was written" in process.stderr.read()
        assert leftovers(tmp_path) == []
    else:
        # A killed process cannot clean up; the next merge to the same target does.
        assert len(leftovers(tmp_path)) == 1
        assert run(["merge", *sharded, "--out", out, "-q"], capsys)[0] == 0
        assert leftovers(tmp_path) == [] and out.is_dir()
    process.stdout.close()
    process.stderr.close()
