"""Merge configurations: the YAML schema (in mergekit's style) and the record
of how a model was merged, which has the same schema, so that the
``merge_config.yaml`` written next to a merged model can be run again.

.. code-block:: yaml

    merge_method: cart
    models:
      - model: ./finetuned-a
      - model: ./finetuned-b
    base_model: ./pretrained      # optional, checked only (it cancels out of CART)
    parameters:
      rank_ratio: 0.08            # or rank: 32
      scale: 2.0
    dtype: float32                # compute dtype: float32 or float64
    out_dtype: bfloat16           # optional: float32, float16 or bfloat16
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .cart import MergeSettings
from .selection import KEY_PRESETS, key_preset

SUPPORTED_METHODS = ("cart",)
TOP_LEVEL_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "lowrank_merge_version")
PARAMETER_KEYS = ("rank_ratio", "rank", "scale", "preset", "include", "exclude", "svd", "niter", "oversample", "seed")
MODEL_KEYS = ("model",)

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
}
OUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ConfigError(ValueError):
    """A merge configuration that cannot be used; the message says where."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    if name not in COMPUTE_DTYPES:
        raise ConfigError(
            f"dtype (the compute dtype) must be float32 or float64, got {name!r}; CART never decomposes in "
            "half precision: set out_dtype (--out-dtype) to write float16 or bfloat16"
        )
    return COMPUTE_DTYPES[name]


def out_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in OUT_DTYPES:
        raise ConfigError(f"out_dtype must be one of float32, float16, bfloat16, got {name!r}")
    return OUT_DTYPES[name]


def _patterns(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(f"{where} must be a regular expression or a list of them, got {value!r}")


@dataclass
class MergeConfig:
    """What to merge and how: models, base model, CART parameters, dtypes."""

    models: list[str]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    merge_method: str = "cart"

    def with_overrides(
        self,
        *,
        parameters: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        dtype: str | None = None,
        out_dtype: str | None = None,
    ) -> "MergeConfig":
        """A copy with the given values replacing the config's (None keeps the config's)."""
        merged = dict(self.parameters)
        given = {key: value for key, value in (parameters or {}).items() if value is not None}
        if "rank" in given:
            merged.pop("rank_ratio", None)
        if "rank_ratio" in given:
            merged.pop("rank", None)
        merged.update(given)
        return replace(
            self,
            parameters=merged,
            base_model=base_model if base_model is not None else self.base_model,
            dtype=dtype if dtype is not None else self.dtype,
            out_dtype=out_dtype if out_dtype is not None else self.out_dtype,
        )

    def settings(self, device: torch.device | str | None = None) -> MergeSettings:
        """The validated :class:`MergeSettings` (raises ValueError/TypeError)."""
        params = dict(self.parameters)
        unknown = sorted(set(params) - set(PARAMETER_KEYS))
        if unknown:
            raise ConfigError(f"unknown parameter {unknown[0]!r}; known parameters: {', '.join(PARAMETER_KEYS)}")
        preset = params.pop("preset", None)
        filters: dict[str, Any] = {"include": None, "exclude": None}
        if preset is not None:
            if preset not in KEY_PRESETS:
                raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(KEY_PRESETS)}")
            filters.update(key_preset(preset))
        for key in ("include", "exclude"):
            patterns = _patterns(params.pop(key, None), key)
            if patterns is not None:
                filters[key] = patterns
        return MergeSettings.create(
            **params,
            **filters,
            device=device,
            compute_dtype=compute_dtype(self.dtype),
            out_dtype=out_dtype(self.out_dtype),
        )


def parse_config(data: Any, source: str = "config") -> MergeConfig:
    """Check a parsed YAML document against the schema."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with merge_method, models and parameters")
    unknown = [key for key in data if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(TOP_LEVEL_KEYS)}")
    method = data.get("merge_method")
    if method is None:
        raise ConfigError(f"{source}: missing merge_method (supported: {', '.join(SUPPORTED_METHODS)})")
    if method not in SUPPORTED_METHODS:
        raise ConfigError(
            f"{source}: merge_method {method!r} is not supported; supported methods: {', '.join(SUPPORTED_METHODS)}"
        )
    models_value = data.get("models")
    if not isinstance(models_value, list) or not models_value:
        raise ConfigError(f"{source}: models must be a non-empty list of model paths")
    models = [_model_path(entry, f"{source}: models[{i}]") for i, entry in enumerate(models_value)]
    base = data.get("base_model")
    base = None if base is None else _model_path(base, f"{source}: base_model")
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ConfigError(f"{source}: parameters must be a mapping, got {parameters!r}")
    unknown = [key for key in parameters if key not in PARAMETER_KEYS]
    if unknown:
        raise ConfigError(
            f"{source}: unknown parameter {unknown[0]!r}; known parameters: {', '.join(PARAMETER_KEYS)}"
        )
    if "rank" in parameters and "rank_ratio" in parameters:
        raise ConfigError(f"{source}: give either parameters.rank or parameters.rank_ratio, not both")
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a dtype name such as float32, got {value!r}")
        dtypes[key] = value
    return MergeConfig(models=models, base_model=base, parameters=dict(parameters), merge_method=method, **dtypes)


def _model_path(entry: Any, where: str) -> str:
    if isinstance(entry, (str, os.PathLike)):
        return os.fspath(entry)
    if isinstance(entry, Mapping):
        if "parameters" in entry:
            raise ConfigError(f"{where}: per-model parameters are not supported by cart; put them under parameters")
        unknown = [key for key in entry if key not in MODEL_KEYS]
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (a model entry is {{model: PATH}})")
        if isinstance(entry.get("model"), str):
            return entry["model"]
    raise ConfigError(f"{where}: expected a path or {{model: PATH}}, got {entry!r}")


def load_config(path: str | os.PathLike[str]) -> MergeConfig:
    """Read and check a YAML merge configuration."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from error
    return parse_config(data, str(path))


def settings_record(settings: MergeSettings) -> dict[str, Any]:
    """The parameters of ``settings``, defaults resolved (so a rerun is identical)."""
    key_filter = settings.key_filter
    parameters: dict[str, Any] = {}
    if settings.rank is not None:
        parameters["rank"] = settings.rank
    else:
        parameters["rank_ratio"] = settings.rank_ratio
    parameters["scale"] = settings.scale
    if key_filter.include is not None:
        parameters["include"] = [pattern.pattern for pattern in key_filter.include]
    parameters["exclude"] = [pattern.pattern for pattern in key_filter.exclude]
    parameters.update(svd=settings.svd, niter=settings.niter, oversample=settings.oversample, seed=settings.seed)
    return parameters


def merge_record(
    models: list[str], base_model: str | None, settings: MergeSettings, version: str | None = None
) -> dict[str, Any]:
    """How a model was merged, as a config that :func:`parse_config` accepts."""
    if version is None:
        from . import __version__ as version
    record: dict[str, Any] = {"merge_method": "cart", "models": [{"model": str(model)} for model in models]}
    if base_model is not None:
        record["base_model"] = str(base_model)
    record["parameters"] = settings_record(settings)
    record["dtype"] = dtype_name(settings.compute_dtype)
    if settings.out_dtype is not None:
        record["out_dtype"] = dtype_name(settings.out_dtype)
    record["lowrank_merge_version"] = version
    return record


def record_yaml(record: Mapping[str, Any]) -> str:
    import yaml

    header = "# How this model was merged; rerun with: lowrank-merge merge --config merge_config.yaml OUT\n"
    return header + yaml.safe_dump(dict(record), sort_keys=False, allow_unicode=True)
