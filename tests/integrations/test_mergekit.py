"""lowrank_merge against mergekit 0.1.5, and CART inside mergekit.

* ``task_arithmetic`` and ``ties`` (per-tensor trimming) against mergekit's own
  implementations of the same rules, on identical random state dicts.
* ``cart``, ``tsv``, ``iso_c``, ``iso_cts`` registered in mergekit give the
  tensors of lowrank_merge, through ``merge_state_dicts`` and through the
  ``lowrank-mergekit`` console script on a mergekit YAML.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _integration import max_abs_diff, require

mergekit = require("mergekit")

import lowrank_merge as lm  # noqa: E402
import lowrank_merge.integrations.mergekit as lm_mergekit  # noqa: E402
from conftest import make_models  # noqa: E402
from mergekit.merge_methods import merge_state_dicts  # noqa: E402


def tasks_and_base(T: int = 3, seed: int = 0) -> tuple[list[dict], dict]:
    models = make_models(T + 1, 16, seed=seed)
    return models[1:], models[0]


def mergekit_with_base(models, base, method: str, parameters: dict) -> dict:
    """mergekit's in-memory merge with ``base`` as the last input."""
    return merge_state_dicts([*models, base], method, base=len(models), parameters=parameters)


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_task_arithmetic_agrees_with_mergekit(scale):
    models, base = tasks_and_base()
    ours = lm.merge(models, "task_arithmetic", base=base, scale=scale)
    theirs = mergekit_with_base(models, base, "task_arithmetic", {"weight": 1.0, "lambda": scale})
    diff = max_abs_diff(ours, theirs)
    print(f"task_arithmetic scale={scale}: max abs diff vs mergekit {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.parametrize(("density", "scale"), [(0.2, 1.0), (0.5, 0.7), (1.0, 1.0)])
def test_ties_agrees_with_mergekit(density, scale):
    models, base = tasks_and_base()
    ours = lm.merge(models, "ties", base=base, density=density, scale=scale, trim="tensor")
    theirs = mergekit_with_base(models, base, "ties", {"weight": 1.0, "density": density, "lambda": scale})
    diff = max_abs_diff(ours, theirs)
    print(f"ties density={density} scale={scale}: max abs diff vs mergekit {diff:.3g}")
    assert diff <= 1e-6


def test_cart_in_mergekit_is_cart_merge():
    models, base = tasks_and_base()
    expected = lm.cart_merge(models, rank_ratio=0.25, scale=1.5)
    parameters = {"rank_ratio": 0.25, "scale": 1.5}
    assert max_abs_diff(merge_state_dicts(models, "cart", parameters=parameters), expected) == 0.0
    assert max_abs_diff(mergekit_with_base(models, base, "cart", parameters), expected) == 0.0
    exact = lm.cart_merge(models, rank=2, svd="exact", exclude="head", scale=1.0)
    theirs = merge_state_dicts(models, "cart", parameters={"rank": 2, "svd": "exact", "exclude": "head", "scale": 1.0})
    assert max_abs_diff(theirs, exact) == 0.0


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_svd_methods_in_mergekit_are_lowrank_merge(method):
    models, base = tasks_and_base()
    assert max_abs_diff(mergekit_with_base(models, base, method, {}), lm.merge(models, method, base=base)) == 0.0


def test_registration_is_idempotent_and_bad_input_is_reported():
    lm_mergekit.register()
    assert {"cart", "tsv", "iso_c", "iso_cts"} <= {m.spec.name for m in mergekit.merge_methods.registered_methods()}
    models, _ = tasks_and_base(2)
    with pytest.raises(ValueError, match=r"rank_ratio must be in \(0, 1\]"):
        merge_state_dicts(models, "cart", parameters={"rank_ratio": 1.5})
    with pytest.raises(ValueError, match="requires a base"):
        merge_state_dicts(models, "tsv")


def test_lowrank_mergekit_runs_a_mergekit_yaml(tmp_path: Path):
    """End to end: a tiny Llama checkpoint, `merge_method: cart`, mergekit's own CLI."""
    transformers = require("transformers")
    from safetensors.torch import load_file

    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    for index in range(2):
        model = transformers.LlamaForCausalLM(config)
        with torch.no_grad():
            model.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in base.state_dict().items()})
        model.save_pretrained(tmp_path / f"task{index}")
    (tmp_path / "config.yaml").write_text(
        f"merge_method: cart\nbase_model: {tmp_path / 'base'}\n"
        f"models:\n  - model: {tmp_path / 'task0'}\n  - model: {tmp_path / 'task1'}\n"
        "parameters:\n  rank_ratio: 0.25\n  scale: 1.5\ndtype: float32\n"
    )
    script = Path(sys.executable).with_name("lowrank-mergekit")
    result = subprocess.run(
        [str(script), str(tmp_path / "config.yaml"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_file(tmp_path / "out" / "model.safetensors")
    tasks = [load_file(tmp_path / f"task{index}" / "model.safetensors") for index in range(2)]
    expected = lm.cart_merge(tasks, rank_ratio=0.25, scale=1.5)
    assert max_abs_diff({k: merged[k] for k in expected}, expected) == 0.0


def test_parameters_mergekit_would_ignore_are_errors(tmp_path: Path):
    """mergekit drops undeclared and per-model parameters without a word; lowrank-mergekit refuses them."""
    config = {
        "merge_method": "cart",
        "models": [{"model": "a", "parameters": {"scale": 3.0}}, {"model": "b"}],
        "parameters": {"rank_ration": 0.5, "density": 0.5, "scale": 1.5},
    }
    problems = lm_mergekit.unknown_parameters(config)
    assert problems[0].startswith("parameters: merge method 'cart' takes no ['density', 'rank_ration']")
    assert problems[1].startswith("models[0].parameters: 'cart' takes no per-model parameters")
    assert lm_mergekit.unknown_parameters({"merge_method": "cart", "parameters": {"rank_ratio": 0.5}}) == []
    assert lm_mergekit.unknown_parameters({"merge_method": "ties", "parameters": {"whatever": 1}}) == []  # mergekit's own
    (tmp_path / "config.yaml").write_text(
        "merge_method: cart\nmodels:\n  - model: a\n  - model: b\nparameters:\n  rank_ration: 0.5\n"
    )
    script = Path(sys.executable).with_name("lowrank-mergekit")
    result = subprocess.run([str(script), str(tmp_path / "config.yaml"), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and "takes no ['rank_ration']" in result.stderr
    assert not (tmp_path / "out").exists()


def test_model_card_links_the_paper():
    spec = lm_mergekit.LowRankMergeMethod("cart").spec
    assert spec.reference_url == "https://arxiv.org/abs/2412.12153"
