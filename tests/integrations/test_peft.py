"""The PEFT-style functions on real PEFT LoRA adapters.

Two LoRA adapters on a tiny model; their delta weights (``get_delta_weight``)
are merged with ``lowrank_merge.integrations.peft`` and checked against a
float64 dense reference of CART, PEFT's own ``task_arithmetic`` (at full rank
CART is the average), and lowrank_merge's whole-model API.
"""

from __future__ import annotations

import pytest
import torch
from _integration import require
from torch import nn

peft = require("peft")

import lowrank_merge as lm  # noqa: E402
from lowrank_merge.integrations import peft as lm_peft  # noqa: E402
from peft.utils import merge_utils  # noqa: E402


ADAPTERS = ("math", "code", "chat")


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def lora_deltas() -> tuple[nn.Module, dict[str, list[torch.Tensor]]]:
    """A PEFT model with three adapters (rank 4, random B) and their delta weights per layer."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model = peft.get_peft_model(TwoLayers(), config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, config)
    layers = {"fc1": model.base_model.model.fc1, "fc2": model.base_model.model.fc2}
    with torch.no_grad():
        deltas = {layer: [module.get_delta_weight(n) for n in ADAPTERS] for layer, module in layers.items()}
    return model, deltas


def reference_cart(deltas: list[torch.Tensor], k: int, scale: float) -> torch.Tensor:
    X = [d.double() for d in deltas]
    mean = sum(X) / len(X)
    low_rank = 0
    for x in X:
        U, S, Vh = torch.linalg.svd(x - mean, full_matrices=False)
        low_rank = low_rank + U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    return mean + scale * low_rank


def test_cart_of_lora_deltas():
    _, deltas = lora_deltas()
    for layer, tensors in deltas.items():
        got = lm_peft.cart(tensors, torch.ones(3), rank=2, scale=1.5, svd="exact", compute_dtype=torch.float64)
        assert torch.allclose(got.double(), reference_cart(tensors, 2, 1.5), rtol=0, atol=1e-6), layer
        average = merge_utils.task_arithmetic(tensors, torch.full((3,), 1 / 3))
        assert torch.allclose(lm_peft.cart(tensors, torch.ones(3), rank_ratio=1.0), average, atol=1e-6), layer


def test_weights_scale_the_task_tensors_first_as_in_peft():
    _, deltas = lora_deltas()
    tensors = deltas["fc1"]
    weights = torch.tensor([2.0, 0.5, 1.0])
    scaled = [w * t for w, t in zip(weights, tensors)]
    assert torch.equal(lm_peft.iso_cts(tensors, weights), lm_peft.iso_cts(scaled, torch.ones(3)))
    assert torch.equal(lm_peft.tsv(tensors, weights.tolist()), lm_peft.tsv(scaled, [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"weights must have shape \[3\]"):
        lm_peft.cart(tensors, torch.ones(2))


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_svd_methods_match_the_whole_model_api(method):
    """The per-tensor functions merge task vectors: lowrank_merge.merge with a zero base."""
    _, deltas = lora_deltas()
    tensors = deltas["fc2"]
    models = [{"w": t} for t in tensors]
    expected = lm.merge(models, method, base={"w": torch.zeros_like(tensors[0])}, exclude=())["w"]
    assert torch.equal(getattr(lm_peft, method)(tensors, torch.ones(3)), expected)


def test_merged_delta_loads_into_the_base_model():
    """The LoRA use: add the merged delta to the frozen base weight and run the model."""
    model, deltas = lora_deltas()
    base = model.base_model.model
    merged = TwoLayers()
    merged.load_state_dict({k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora_" not in k})
    with torch.no_grad():
        for layer, tensors in deltas.items():
            getattr(merged, layer).weight += lm_peft.cart(tensors, torch.ones(3), rank_ratio=0.25, scale=2.0)
    out = merged(torch.randn(5, 24))
    assert out.shape == (5, 16) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_key_filters_are_refused_for_one_unnamed_tensor(key):
    tensors = [torch.randn(6, 4) for _ in range(2)]
    with pytest.raises(TypeError, match=f"cart\\(\\) takes no {key}: it merges one tensor"):
        lm_peft.cart(tensors, [1.0, 1.0], **{key: "attn"})
