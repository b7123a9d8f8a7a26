"""Helpers of the integration tests (run by .ci/integrations.sh in their own venvs)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

#: Comma-separated packages that must be importable: their tests fail instead of
#: skipping (set by .ci/integrations.sh in the venv built for them).
REQUIRE_ENV = "LOWRANK_MERGE_REQUIRE"


def require(package: str) -> ModuleType:
    """Import ``package``, or skip the test module with a message saying how to run it."""
    if package in os.environ.get(REQUIRE_ENV, "").split(","):
        return importlib.import_module(package)
    return pytest.importorskip(
        package, reason=f"{package} is not installed here; .ci/integrations.sh runs these tests in a venv with it"
    )


def max_abs_diff(got: dict[str, Tensor], expected: dict[str, Tensor]) -> float:
    """Largest |got − expected| over all tensors (same keys required)."""
    assert list(got) == list(expected)
    return max(float((got[k].double() - expected[k].double()).abs().max()) for k in expected if expected[k].numel())


class TinyMLP(nn.Module):
    """A small module for the FusionBench pool (importable by Hydra as ``_integration.load_tiny``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 8)


def load_tiny(path: str) -> TinyMLP:
    model = TinyMLP()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model
