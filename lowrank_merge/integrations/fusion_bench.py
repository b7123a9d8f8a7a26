"""lowrank_merge's methods as FusionBench algorithms.

``CARTAlgorithm`` (and ``LowRankMergeAlgorithm`` for any method of
:data:`lowrank_merge.METHODS`) implement ``BaseAlgorithm.run(modelpool)``:
they load the pool's models, merge their state dicts with
:func:`lowrank_merge.merge` (the pool's ``_pretrained_`` model is the base)
and return a copy of the base (or first) model holding the merged weights.

    fusion_bench method._target_=lowrank_merge.integrations.fusion_bench.CARTAlgorithm \\
        +method.rank_ratio=0.12 +method.scale=2.0 modelpool=... taskpool=...

or, with the YAML configs shipped in :data:`CONFIG_DIR` on Hydra's search path:

    fusion_bench 'hydra.searchpath=[pkg://lowrank_merge.integrations.fusion_bench_config]' \\
        method=lowrank_merge/cart method.rank_ratio=0.12 modelpool=... taskpool=...
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import torch
from fusion_bench.method import BaseAlgorithm
from fusion_bench.modelpool import BaseModelPool
from torch import nn

from ..cart import DEFAULT_RANK_RATIO, DEFAULT_SCALE
from ..config import compute_dtype, out_dtype
from ..methods import check_base, merge, method_settings

#: Hydra config directory holding ``method/lowrank_merge/{cart,merge}.yaml``.
CONFIG_DIR = str(Path(__file__).with_name("fusion_bench_config"))


class LowRankMergeAlgorithm(BaseAlgorithm):
    """Any lowrank_merge method (``method=``) with its parameters as keyword arguments.

    Parameters are checked when the algorithm is built, before any model loads.
    """

    def __init__(self, method: str = "cart", **parameters: object) -> None:
        super().__init__()
        # Hydra passes dtypes as their names ("float64"): read them as the YAML configs are.
        for key, read in (("compute_dtype", compute_dtype), ("out_dtype", out_dtype)):
            if isinstance(parameters.get(key), str):
                parameters[key] = read(parameters[key])
        self.spec = method_settings(method, **parameters).spec
        self.method = method
        self.parameters = parameters

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | dict[str, nn.Module]) -> nn.Module:
        """Merge the pool's models; returns a new module, the pool's models are not modified."""
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        if not modelpool.has_pretrained:
            check_base(self.spec, None)  # a method that needs a base fails here, before any model loads
        models = [modelpool.load_model(name) for name in modelpool.model_names]
        base = modelpool.load_pretrained_model() if modelpool.has_pretrained else None
        merged = merge(
            [model.state_dict() for model in models],
            self.method,
            base=None if base is None else base.state_dict(),
            **self.parameters,
        )
        result = deepcopy(models[0] if base is None else base)
        result.load_state_dict(merged)
        return result


class CARTAlgorithm(LowRankMergeAlgorithm):
    """CART (Choi et al. 2024): θ_avg + scale · Σ_t SVD_k(θ_t − θ_avg) per selected matrix.

    Keyword arguments as :func:`lowrank_merge.cart_merge` (``include``,
    ``exclude``, ``svd``, ``niter``, ``oversample``, ``seed``, ``device``, ...).
    """

    def __init__(self, rank_ratio: float = DEFAULT_RANK_RATIO, scale: float = DEFAULT_SCALE, **options: object) -> None:
        super().__init__("cart", rank_ratio=rank_ratio, scale=scale, **options)
