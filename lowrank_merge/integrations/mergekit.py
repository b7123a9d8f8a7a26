"""lowrank_merge's SVD methods as mergekit merge methods.

mergekit 0.1.5 has no plugin entry points; importing this module calls
:func:`register`, which adds ``cart``, ``tsv``, ``iso_c`` and ``iso_cts`` to
mergekit's registry (``mergekit.merge_methods.register``). Then

    import lowrank_merge.integrations.mergekit  # noqa: F401
    merged = mergekit.merge_methods.merge_state_dicts(models, "cart", parameters={"rank_ratio": 0.1, "scale": 2.0})

gives the tensors of ``lowrank_merge.cart_merge(models, rank_ratio=0.1,
scale=2.0)``, and the console script ``lowrank-mergekit config.yaml out/``
(:func:`main`) runs ``mergekit-yaml`` with ``merge_method: cart`` (or ``tsv``,
``iso_c``, ``iso_cts``) available.

Parameters (shared by every tensor, or per tensor with mergekit's filters):
the method's own (``rank_ratio``, ``rank``, ``scale``, ``common_fraction``)
and the engine options ``include`` / ``exclude`` (one regular expression
each: mergekit reads YAML lists as gradients), ``svd``, ``niter``,
``oversample``, ``seed``. A base model is optional for ``cart`` (checked
only) and required by the others. mergekit itself chooses the dtype
(``dtype:`` / ``out_dtype:``) and device (``--cuda``); the math runs in
float32 as in :func:`~lowrank_merge.cart_merge`. ``task_arithmetic`` and
``ties`` are not registered: mergekit has its own, which agree with
lowrank_merge's (``ties`` with ``trim="tensor"``; see tests/integrations).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from mergekit.merge_methods import (
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    TensorGroup,
    register as register_method,
    registered_methods,
)
from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from ..methods import COMPUTE_PARAMETERS, get_method, merge_method_tensor, method_settings

#: The lowrank_merge methods registered with mergekit.
REGISTERED = ("cart", "tsv", "iso_c", "iso_cts")

#: mergekit (pydantic) types of the parameters, by their names common to all methods.
PARAMETER_TYPES: dict[str, Any] = {
    "scale": float,
    "rank_ratio": float | None,
    "rank": int | None,
    "common_fraction": float,
    "include": str | None,
    "exclude": str | None,
    "svd": str | None,
    "niter": int | None,
    "oversample": int | None,
    "seed": int | None,
}


class LowRankMergeMethod(GroupMergeMethod):
    """One lowrank_merge method, run by mergekit one output tensor at a time."""

    def __init__(self, method: str) -> None:
        spec = get_method(method)
        self.method = method
        self.spec = MergeMethodSpec(
            name=method,
            parameters=tuple(
                ParameterSpec(name, PARAMETER_TYPES[name], ParameterScope.SHARED, default=spec.parameters.get(name))
                for name in spec.accepted
                if name not in COMPUTE_PARAMETERS
            ),
            contract=InputContract(
                base=BasePolicy.REQUIRED if spec.needs_base else BasePolicy.OPTIONAL, min_non_base=1
            ),
            pretty_name=f"{method} (lowrank_merge)",
            reference_url=spec.reference_url,
        )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        """Merge one tensor group: the non-base entries are the T models."""
        settings = method_settings(self.method, **{k: v for k, v in parameters.items() if v is not None})
        entries = group.non_base
        base = group.base.tensor if group.base is not None and settings.spec.needs_base else None
        return merge_method_tensor(
            group.metadata.name or "", [e.tensor for e in entries], base, settings, [str(e.id) for e in entries]
        )


def register() -> None:
    """Add :data:`REGISTERED` to mergekit's registry (once; later calls do nothing)."""
    present = {method.spec.name for method in registered_methods()}
    for method in REGISTERED:
        if method not in present:
            register_method(LowRankMergeMethod(method))


def unknown_parameters(config: Mapping[str, Any]) -> list[str]:
    """What mergekit would silently ignore in a config for one of :data:`REGISTERED`:
    parameters the method does not take, and any per-model parameter (every
    parameter of these methods is shared by the models). Messages, one per place."""
    method = config.get("merge_method")
    if method not in REGISTERED:
        return []
    accepted = [parameter.name for parameter in LowRankMergeMethod(method).spec.parameters]
    problems = []
    unknown = sorted(set(config.get("parameters") or {}) - set(accepted))
    if unknown:
        problems.append(f"parameters: merge method {method!r} takes no {unknown}; its parameters: {', '.join(accepted)}")
    sources = [("models", config.get("models") or [])]
    sources += [(f"slices[{i}].sources", slice_.get("sources") or []) for i, slice_ in enumerate(config.get("slices") or [])]
    for where, entries in sources:
        for index, entry in enumerate(entries):
            if isinstance(entry, Mapping) and entry.get("parameters"):
                problems.append(
                    f"{where}[{index}].parameters: {method!r} takes no per-model parameters "
                    f"(all of its parameters are shared: give them under the top-level parameters)"
                )
    return problems


def main() -> None:
    """``lowrank-mergekit CONFIG OUT [options]``: mergekit-yaml with lowrank_merge's methods.

    The config is read first: a parameter that mergekit would ignore for one of
    lowrank_merge's methods is an error here, as it is in lowrank_merge."""
    register()
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("-")]
    if arguments and Path(arguments[0]).is_file():
        config = yaml.safe_load(Path(arguments[0]).read_text(encoding="utf-8"))
        problems = unknown_parameters(config) if isinstance(config, Mapping) else []
        if problems:
            sys.exit("lowrank-mergekit: " + "; ".join(problems))
    mergekit_yaml()


register()
