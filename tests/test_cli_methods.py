"""Every merge method through the command line, the YAML config and the
streaming merge: outputs equal ``lowrank_merge.merge`` on the same tensors bit
for bit, the merge record reruns, and a missing base or a parameter the method
does not take fails early with one clear line and no output."""

from __future__ import annotations

import json
import os
import re
import textwrap

import pytest
import torch
import yaml

import lowrank_merge as lm
from lowrank_merge import cli
from lowrank_merge.checkpoints import open_checkpoint
from lowrank_merge.streaming import merge_checkpoints

from _checkpoint_models import assert_same_state, load_output, output_metadata, save_models, tiny_models


@pytest.fixture(scope="module")
def tasks_and_base():
    """Three fine-tuned models and their base (siblings of one pretrained model)."""
    models = tiny_models(4, seed=5)
    return models[1:], models[0]


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, tasks_and_base):
    """``(task folders, base folder)``, sharded safetensors (built once, never modified)."""
    tasks, base = tasks_and_base
    root = tmp_path_factory.mktemp("methods")
    *paths, base_path = save_models(root, [*tasks, base], shards=2)
    return paths, base_path


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowrank-merge: error: "), err
    return lines[0]


CASES = [
    ("cart", ["--rank", "2", "--scale", "1.5"], {"rank": 2, "scale": 1.5}),
    ("average", [], {}),
    ("task_arithmetic", ["--scale", "0.5"], {"scale": 0.5}),
    ("ties", ["--density", "0.5", "--trim", "tensor"], {"density": 0.5, "trim": "tensor"}),
    ("ties", ["--density", "0.3"], {"density": 0.3}),  # trim="model": the streaming pre-pass
    ("ties", ["--density", "0.3", "--dtype", "float64"], {"density": 0.3, "compute_dtype": torch.float64}),
    ("tsv", ["--rank-ratio", "0.5", "--svd", "exact"], {"rank_ratio": 0.5, "svd": "exact"}),
    ("iso_c", ["--out-dtype", "bfloat16"], {"out_dtype": torch.bfloat16}),
    ("iso_cts", ["--common-fraction", "0.5", "--preset", "reference"], {"common_fraction": 0.5, **lm.key_preset("reference")}),
]


@pytest.mark.parametrize("method, options, parameters", CASES, ids=[" ".join([m, *o]) for m, o, _ in CASES])
def test_cli_equals_merge(method, options, parameters, tmp_path, on_disk, tasks_and_base, capsys):
    paths, base_path = on_disk
    tasks, base = tasks_and_base
    out = tmp_path / "merged"
    code, _, err = run(["merge", *paths, "--base", base_path, "--out", out, "--method", method, *options, "-q"], capsys)
    assert code == 0, err
    expected = lm.merge(tasks, method, base=base, **parameters)
    assert_same_state(load_output(out), expected)
    record = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert record["merge_method"] == method and record["base_model"] == str(base_path)
    assert set(record["parameters"]) <= set(lm.get_method(method).accepted)
    metadata = output_metadata(out)
    assert metadata["merge_method"] == method and json.loads(metadata["merge_config"]) == record
    # The record is a config that repeats the merge.
    again = tmp_path / "again"
    assert run(["merge", "--config", out / "merge_config.yaml", again, "-q"], capsys)[0] == 0
    assert_same_state(load_output(again), expected)


def test_ties_whole_model_trim_streams_a_pre_pass(tmp_path, on_disk, tasks_and_base):
    """With prefetching (the reading thread) and the base read alongside; the
    whole-model threshold differs from the per-tensor one, so the pre-pass counts."""
    paths, base_path = on_disk
    tasks, base = tasks_and_base
    settings = lm.method_settings("ties", density=0.3, trim="model")
    result = merge_checkpoints(paths, tmp_path / "out", settings, base=base_path, prefetch=True)
    merged = load_output(tmp_path / "out")
    assert_same_state(merged, lm.merge(tasks, "ties", base=base, density=0.3, trim="model"))
    per_tensor = lm.merge(tasks, "ties", base=base, density=0.3, trim="tensor")
    assert any(not torch.equal(merged[name], per_tensor[name]) for name in merged)
    one_pass = sum(open_checkpoint(path).total_bytes() for path in [*paths, base_path])
    assert result.bytes_read == 3 * one_pass  # two radix passes in float32, then the merge


def test_yaml_ties(tmp_path, on_disk, tasks_and_base, capsys):
    paths, base_path = on_disk
    tasks, base = tasks_and_base
    config = tmp_path / "ties.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            merge_method: ties
            models: [{paths[0]}, {paths[1]}, {paths[2]}]
            base_model: {base_path}
            parameters:
              density: 0.5
              scale: 1.0
            """
        )
    )
    code, _, err = run(["merge", "--config", config, tmp_path / "out"], capsys)
    assert code == 0 and "with ties" in err, err
    assert_same_state(load_output(tmp_path / "out"), lm.merge(tasks, "ties", base=base, density=0.5, scale=1.0))


def test_missing_base(tmp_path, on_disk, capsys, forbid_decomposition):
    paths, _ = on_disk
    code, _, err = run(["merge", *paths, "--out", tmp_path / "out", "--method", "task_arithmetic"], capsys)
    line = one_error_line(err)
    assert code == 1 and "merge method 'task_arithmetic' needs base=" in line and "--base PATH" in line
    config = tmp_path / "ta.yaml"
    config.write_text(f"merge_method: task_arithmetic\nmodels: [{paths[0]}, {paths[1]}]\n")
    code, _, err = run(["merge", "--config", config, tmp_path / "out"], capsys)
    assert code == 1 and "needs base=" in one_error_line(err)
    code, out, err = run(["inspect", *paths, "--method", "iso_c"], capsys)
    assert code == 1 and out == "" and "merge method 'iso_c' needs base=" in one_error_line(err)
    assert os.listdir(tmp_path) == ["ta.yaml"]
    # The Python API checks the base before it opens anything.
    with pytest.raises(ValueError, match="'ties' needs base="):
        merge_checkpoints([tmp_path / "nowhere"], tmp_path / "out", lm.method_settings("ties"))


@pytest.mark.parametrize(
    "options, message",
    [
        (["--density", "0.5"], "merge method 'cart' takes no parameter 'density'; its parameters: rank_ratio, rank, scale"),
        (["--method", "ties", "--rank", "4"], "merge method 'ties' takes no parameter 'rank'; its parameters: density, scale, trim"),
        (["--method", "ties", "--preset", "reference"], "merge method 'ties' takes no parameter 'preset'"),
        (["--method", "average", "--scale", "2"], "merge method 'average' takes no parameter 'scale'; its parameters: none"),
        (["--method", "tsv", "--common-fraction", "0.5"], "merge method 'tsv' takes no parameter 'common_fraction'"),
        (["--method", "ties", "--density", "0"], r"density must be in \(0, 1\]"),
    ],
)
def test_parameters_the_method_does_not_take(options, message, tmp_path, on_disk, capsys, forbid_decomposition):
    paths, base_path = on_disk
    code, _, err = run(["merge", *paths, "--base", base_path, "--out", tmp_path / "out", *options], capsys)
    assert code == 1 and re.search(message, one_error_line(err)), err
    assert os.listdir(tmp_path) == []


def test_yaml_parameter_the_method_does_not_take(tmp_path, on_disk, capsys):
    paths, base_path = on_disk
    config = tmp_path / "ties.yaml"
    config.write_text(f"merge_method: ties\nmodels: [{paths[0]}]\nbase_model: {base_path}\nparameters: {{rank: 4}}\n")
    code, _, err = run(["merge", "--config", config, tmp_path / "out"], capsys)
    assert code == 1 and f"{config}: merge method 'ties' takes no parameter 'rank'" in one_error_line(err)


def test_inspect_tsv(on_disk, capsys):
    paths, base_path = on_disk
    code, out, err = run(["inspect", *paths, "--base", base_path, "--method", "tsv"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "settings: method=tsv, scale=1, svd=auto, seed=0, dtype=float32" in lines
    assert any(line.startswith("  base model ") and "checked only" not in line for line in lines)  # tsv reads it
    assert next(row for row in lines if row.startswith("blocks.*.mlp.c_fc.weight ")).split()[1:6] == ["2", "32x8", "float32", "svd", "-"]
    assert next(row for row in lines if row.startswith("blocks.*.mlp.c_fc.bias ")).split()[4] == "tsv"
    assert "total: 37 tensors (13 decomposed by tsv, 21 merged elementwise by tsv, 3 copied)" in out
    assert "low-rank" not in out and "FLOP" not in lines[-1]
