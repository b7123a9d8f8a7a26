"""pytest-benchmark suite over the quick cases of ``benchmarks/run.py`` (issue 7).

    pip install -e .[bench]
    OMP_NUM_THREADS=1 pytest benchmarks/test_benchmarks.py --benchmark-only
    pytest benchmarks/test_benchmarks.py --benchmark-json out.json   # or --benchmark-autosave / --benchmark-compare

It lives outside ``tests/`` so ``pytest tests`` never collects it. Each
benchmark times one layer of a quick case (dimensions / 16, <= 4 tasks) at rank
ratio 0.08: the default engine (auto) and every other lowrank_merge engine, the reference path (thin SVD per task)
and ``torch.svd_lowrank`` per task; the sketch engines' deltas are also checked
against the float64 dense reference (a loose bound: the quick shapes' spectra
have no gap at k).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowrank_merge as lm  # noqa: E402
from lowrank_merge import engines  # noqa: E402
from gpu_merge import quick_case, reference_delta, svd_lowrank_delta, task_stack  # noqa: E402
from run import CASES  # noqa: E402

RATIO = 0.08
#: One layer of each distinct quick case (the largest shape of the whole-model cases).
LAYERS = {}
for _case in map(quick_case, CASES):
    _m, _n, _ = max(_case.shapes, key=lambda shape: shape[0] * shape[1])
    LAYERS.setdefault((_case.tasks, _m, _n), _case.name)


@pytest.fixture(scope="module", params=sorted(LAYERS), ids=lambda key: f"T{key[0]}-{key[1]}x{key[2]}")
def layer(request):
    T, m, n = request.param
    return task_stack(T, m, n, torch.float32, torch.device("cpu"), seed=0), max(1, math.floor(RATIO * min(m, n)))


@pytest.mark.parametrize("engine", ("auto", *engines.ENGINES))
def test_ours(benchmark, layer, engine):
    stack, k = layer
    benchmark.group = f"{list(stack.shape)} k={k}"
    _, delta = benchmark(lm.cart_layer_parts, stack, k, svd=engine)
    target = reference_delta(stack.double(), k)
    error = ((delta.double() - target).norm() / target.norm()).item()
    benchmark.extra_info["rel_err_vs_float64"] = error
    # The accurate engines are near float32 rounding (amplified by the missing gap);
    # the fast sketches only near-optimal in residual.
    assert error < (1e-3 if engine in ("exact", "gram") else 2e-2 if engine in ("auto", "gram_subspace") else 0.5)


def test_reference(benchmark, layer):
    stack, k = layer
    benchmark.group = f"{list(stack.shape)} k={k}"
    benchmark(reference_delta, stack, k)


def test_svd_lowrank(benchmark, layer):
    stack, k = layer
    benchmark.group = f"{list(stack.shape)} k={k}"
    benchmark(svd_lowrank_delta, stack, k)
