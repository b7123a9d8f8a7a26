"""The distributed merge (lowrank_merge/distributed.py): the balanced plan, and
real 2-process gloo runs (torch.multiprocessing, and torchrun through the CLI)
checked bit for bit against the single-process merge, with failures on one rank
leaving no output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lowrank_merge as lm
from lowrank_merge import distributed, streaming
from lowrank_merge.checkpoints import ShardedWriter, TensorSpec
from lowrank_merge.distributed import RankShare, balanced_plan, shard_layout, tensor_costs
from lowrank_merge.streaming import merge_checkpoints, open_models

from _checkpoint_models import assert_same_state, leftovers, load_output, save_models, tiny_models

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available")


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


def _costs(seconds: list[float]) -> dict[str, tuple[int, float, float]]:
    return {f"t{i}": (100 * i, 1e9 * s, s) for i, s in enumerate(seconds)}


def test_plan_assigns_every_name_once_in_disk_order():
    costs = _costs([5, 1, 1, 3, 2, 2, 4, 1])
    shares = balanced_plan(costs, 3)
    assigned = [name for share in shares for name in share.names]
    assert sorted(assigned) == sorted(costs)
    order = list(costs)
    for share in shares:
        assert share.names == sorted(share.names, key=order.index)  # reads move forward through the files
        assert share.seconds == pytest.approx(sum(costs[name][2] for name in share.names))
        assert share.bytes_read == sum(costs[name][0] for name in share.names)
    # Largest first onto the least-loaded rank: loads 7, 6, 6 (the optimum for a total of 19).
    assert sorted(share.seconds for share in shares) == [6, 6, 7]


def test_plan_is_deterministic_and_handles_more_ranks_than_tensors():
    costs = _costs([1, 1, 1])
    assert balanced_plan(costs, 5) == balanced_plan(costs, 5)
    shares = balanced_plan(costs, 5)
    assert [len(share.names) for share in shares] == [1, 1, 1, 0, 0]  # ties: the lowest rank
    assert balanced_plan(costs, 1)[0].names == list(costs)


def test_plan_weighs_decomposition_flops(tmp_path):
    """One big decomposed layer against many averaged ones: FLOPs move the split."""
    models = tiny_models(3)
    paths = save_models(tmp_path, models)
    inputs = open_models(paths)
    settings = lm.method_settings("cart", rank_ratio=0.5)
    costs = tensor_costs(inputs, settings)
    decomposed = {name for name, (_, flops, _) in costs.items() if flops > 3 * inputs.readers[0].nbytes(name)}
    assert decomposed  # the attention and MLP weights carry FLOPs beyond the averaging
    for name, (nbytes, flops, seconds) in costs.items():
        assert nbytes == 3 * inputs.readers[0].nbytes(name)
        assert seconds == pytest.approx(nbytes / distributed.READ_BYTES_PER_SECOND + flops / distributed.FLOPS_PER_SECOND["cpu"])


@pytest.mark.parametrize("world_size", [0, -1, 1.5, True])
def test_plan_rejects_bad_world_sizes(world_size):
    with pytest.raises(ValueError, match="number of ranks must be a positive integer"):
        balanced_plan(_costs([1]), world_size)


def test_shard_layout_gives_each_rank_its_own_shards():
    specs = [TensorSpec(f"t{i}", (10, 10), torch.float32) for i in range(5)]  # 400 bytes each
    shares = [RankShare(0, ["t0", "t3"]), RankShare(1, ["t1", "t2", "t4"]), RankShare(2, [])]
    ordered, shards, owned = shard_layout(shares, specs, max_shard_size=800)
    assert [spec.name for spec in ordered] == ["t0", "t3", "t1", "t2", "t4"]
    assert [[spec.name for spec in shard] for shard in shards] == [["t0", "t3"], ["t1", "t2"], ["t4"]]
    assert owned == [[0], [1, 2], []]
    # An empty model: one empty shard, rank 0's.
    assert shard_layout([RankShare(0, []), RankShare(1, [])], [], 800)[1:] == ([[]], [[0], []])


def test_every_rank_checks_room_for_the_whole_output(tmp_path):
    """The ranks write into one folder: each needs room for all of it, not for its own shards."""
    specs = [TensorSpec(f"t{i}", (10, 10), torch.float32) for i in range(5)]
    shares = [RankShare(0, ["t0", "t3"]), RankShare(1, ["t1", "t2", "t4"])]
    ordered, shards, owned = shard_layout(shares, specs, max_shard_size=800)
    writers = [ShardedWriter(tmp_path / "out", ordered, shards=shards, owned=mine) for mine in owned]
    whole = ShardedWriter(tmp_path / "out", ordered, shards=shards)
    assert [writer.data_bytes for writer in writers] == [800, 1200]  # each rank's own share ...
    assert [writer.required_bytes() for writer in writers] == [whole.required_bytes()] * 2  # ... but room for all
    assert whole.required_bytes() > 2000


# ---------------------------------------------------------------------------
# Real process groups (gloo, 2 CPU processes)
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, paths: list[str], out: str, kwargs: dict, fail_on: dict, results: dict
) -> None:
    """One rank: join the group, merge, record the outcome (spawned by the tests)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    if rank in fail_on:
        failing_name = fail_on[rank]
        original = streaming.merge_method_tensor

        def failing(name, *args, **kw):
            if name == failing_name:
                raise RuntimeError(f"injected failure on {name!r}")
            return original(name, *args, **kw)

        streaming.merge_method_tensor = failing
    try:
        kwargs = dict(kwargs)
        base = kwargs.pop("base", None)
        result = merge_checkpoints(paths, out, lm.method_settings(**kwargs), base=base, distributed=True)
        results[rank] = ("ok", result.tensors, result.files)
    except Exception as error:  # reported to the test, with what was left on disk when this rank gave up
        results[rank] = ("error", type(error).__name__, str(error), leftovers(Path(out).parent))
    finally:
        dist.destroy_process_group()


def _run_ranks(world_size: int, paths, out, kwargs, fail_on=None) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(
            _worker,
            args=(world_size, _free_port(), [str(p) for p in paths], str(out), kwargs, fail_on or {}, results),
            nprocs=world_size,
        )
        return dict(results)


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return root, save_models(root, tiny_models(3), shards=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "cart", "rank_ratio": 0.25, "scale": 1.5},
        {"method": "cart", "rank_ratio": 0.25, "svd": "randomized", "seed": 7},
        {"method": "tsv", "scale": 1.0, "base": 0},
        {"method": "ties", "trim": "tensor", "density": 0.5, "base": 0},
    ],
    ids=["cart-auto", "cart-randomized", "tsv", "ties-per-tensor"],
)
def test_two_ranks_equal_the_single_process_merge_bit_for_bit(tmp_path, saved_models, kwargs):
    _, paths = saved_models
    if "base" in kwargs:  # the first model as the base: a valid, if odd, pretrained model
        kwargs = dict(kwargs, base=str(paths[kwargs["base"]]))
    single = tmp_path / "single"
    settings = lm.method_settings(**{key: value for key, value in kwargs.items() if key != "base"})
    with _one_thread():  # as each rank: BLAS may round differently with more threads
        merge_checkpoints(paths, single, settings, base=kwargs.get("base"), max_shard_size=2**40)
    out = tmp_path / "distributed"
    results = _run_ranks(2, paths, out, kwargs)
    assert [results[rank][0] for rank in (0, 1)] == ["ok", "ok"], results
    assert results[0][1] + results[1][1] == len(load_output(single))  # every tensor merged once
    assert results[0][1] > 0 and results[1][1] > 0  # both ranks worked
    assert_same_state(load_output(out), load_output(single))
    # The index maps every tensor to a shard that exists; config and record were written once.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_output(single))
    assert all((out / file).is_file() for file in index["weight_map"].values())
    assert (out / "config.json").read_bytes() == (paths[0] / "config.json").read_bytes()
    assert (out / "merge_config.yaml").read_text() == (single / "merge_config.yaml").read_text()
    assert sorted(results[0][2]) == sorted(os.listdir(out))
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_rank_aborts_every_rank_and_leaves_no_output(tmp_path, saved_models, failing_rank):
    _, paths = saved_models
    kwargs = {"method": "cart", "rank_ratio": 0.25}
    # A tensor the failing rank merges, by the plan every rank computes.
    inputs = open_models(paths)
    shares = balanced_plan(tensor_costs(inputs, lm.method_settings(**kwargs)), 2)
    victim = shares[failing_rank].names[-1]
    out = tmp_path / "out"
    results = _run_ranks(2, paths, out, kwargs, fail_on={failing_rank: victim})
    for rank in (0, 1):
        status, kind, message, left_when_raised = results[rank]
        assert (status, kind) == ("error", "DistributedMergeError"), results
        assert f"rank {failing_rank}: RuntimeError" in message and "injected failure" in message and victim in message
        assert "no output written" in message
        # No rank returns (and exits: torchrun then stops the others) before the temporary folder is gone.
        assert left_when_raised == [], (rank, left_when_raised)
    assert not out.exists()
    assert not leftovers(tmp_path)


def test_distributed_refuses_what_it_cannot_split(tmp_path, saved_models):
    _, paths = saved_models
    single_file = _run_ranks(2, paths, tmp_path / "merged.safetensors", {"method": "cart"})
    assert all(result[0] == "error" and "writes a folder" in result[2] for result in single_file.values())
    prepass = _run_ranks(2, paths, tmp_path / "ties", {"method": "ties", "trim": "model"})
    assert all(result[0] == "error" and "whole-model pre-pass" in result[2] for result in prepass.values())
    assert not leftovers(tmp_path) and not (tmp_path / "ties").exists()


def test_distributed_needs_a_process_group(tmp_path, saved_models):
    _, paths = saved_models
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        merge_checkpoints(paths, tmp_path / "out", distributed=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# The CLI: torchrun, inspect --plan
# ---------------------------------------------------------------------------


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowrank_merge", *args], capture_output=True, text=True, env=env)


def test_cli_under_torchrun_equals_the_single_process_cli(tmp_path, saved_models):
    _, paths = saved_models
    options = ["--method", "cart", "--rank-ratio", "0.25", "-q"]
    single = tmp_path / "single"
    assert _cli("merge", *map(str, paths), "--out", str(single), *options).returncode == 0
    out = tmp_path / "distributed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "lowrank_merge", "merge", *map(str, paths), "--out", str(out), *options, "--distributed"],
        capture_output=True, text=True, env=env,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_state(load_output(out), load_output(single))
    assert not leftovers(tmp_path)


def test_cli_distributed_without_torchrun_says_how_to_launch(tmp_path, saved_models):
    _, paths = saved_models
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = _cli("merge", *map(str, paths), "--out", str(tmp_path / "out"), "--distributed", env=env)
    assert done.returncode == 2
    assert "torchrun --nproc-per-node N" in done.stderr and "RANK" in done.stderr
    assert not (tmp_path / "out").exists()


def test_inspect_plan_shows_each_rank_and_the_balance(saved_models):
    _, paths = saved_models
    done = _cli("inspect", *map(str, paths), "--rank-ratio", "0.25", "--plan", "3")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "plan of a --distributed merge over 3 processes" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    inputs = open_models(paths)
    assert sum(int(row[1]) for row in rows) == len(inputs.metas)
    assert "balance: the busiest rank has" in text
    bad = _cli("inspect", *map(str, paths), "--plan", "0")
    assert bad.returncode == 2 and "--plan needs a positive number" in bad.stderr


def test_inspect_plan_matches_the_plan_the_merge_uses(saved_models):
    _, paths = saved_models
    inputs = open_models(paths)
    settings = lm.method_settings("cart", rank_ratio=0.25)
    shares = balanced_plan(tensor_costs(inputs, settings), 2)
    done = _cli("inspect", *map(str, paths), "--rank-ratio", "0.25", "--plan", "2")
    counts = [int(line.split()[1]) for line in done.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert counts == [len(share.names) for share in shares]

