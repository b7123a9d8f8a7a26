"""Merge configurations: the YAML schema (in mergekit's style) and the record
of how a model was merged, which has the same schema, so that the
``merge_config.yaml`` written next to a merged model can be run again.

.. code-block:: yaml

    merge_method: ties            # any of lowrank_merge.METHODS (default on the command line: cart)
    models:
      - model: ./finetuned-a
      - model: ./finetuned-b
    base_model: ./pretrained      # required by the task-vector methods; checked only by cart and average
    parameters:                   # the method's own (see parameter_keys)
      density: 0.2
      scale: 1.0
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
from .methods import COMPUTE_PARAMETERS, METHODS, MethodSettings, MethodSpec, check_base, get_method, method_settings
from .selection import key_preset

SUPPORTED_METHODS = tuple(METHODS)
TOP_LEVEL_KEYS = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "lowrank_merge_version")
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
            f"dtype (the compute dtype) must be float32 or float64, got {name!r}; merges never run in "
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


def parameter_keys(spec: MethodSpec) -> tuple[str, ...]:
    """The ``parameters:`` a config of ``spec`` takes: the method's own, and for
    the SVD methods ``preset`` and the key-filter and engine options (device and
    dtypes are set elsewhere: ``--device``, ``dtype``, ``out_dtype``)."""
    keys = tuple(key for key in spec.accepted if key not in COMPUTE_PARAMETERS)
    return (*keys, "preset") if spec.uses_svd else keys


def _check_parameters(spec: MethodSpec, parameters: Mapping[str, Any], where: str = "") -> None:
    unknown = [key for key in parameters if key not in parameter_keys(spec)]
    if unknown:
        raise ConfigError(
            f"{where}merge method {spec.name!r} takes no parameter {unknown[0]!r}; "
            f"its parameters: {', '.join(parameter_keys(spec)) or 'none'}"
        )


@dataclass
class MergeConfig:
    """What to merge and how: method, models, base model, parameters, dtypes."""

    models: list[str]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    merge_method: str = "cart"

    def with_overrides(
        self,
        *,
        merge_method: str | None = None,
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
        if "preset" in given:  # a preset is a whole key filter: it replaces the config's patterns too
            merged.pop("include", None)
            merged.pop("exclude", None)
        merged.update(given)
        return replace(
            self,
            merge_method=merge_method if merge_method is not None else self.merge_method,
            parameters=merged,
            base_model=base_model if base_model is not None else self.base_model,
            dtype=dtype if dtype is not None else self.dtype,
            out_dtype=out_dtype if out_dtype is not None else self.out_dtype,
        )

    def settings(self, device: torch.device | str | None = None) -> MethodSettings:
        """The validated :class:`~lowrank_merge.MethodSettings` of the config's method.

        Raises ValueError/TypeError for a parameter the method does not take,
        a bad value, or a missing ``base_model`` the method needs.
        """
        spec = get_method(self.merge_method)
        params = dict(self.parameters)
        _check_parameters(spec, params)
        if spec.uses_svd:
            preset = params.pop("preset", None)
            if preset is not None:
                params = {**key_preset(preset), **params}  # include/exclude given replace the preset's
            for key in ("include", "exclude"):
                params[key] = _patterns(params.get(key), key)
        settings = method_settings(
            spec.name,
            **params,
            device=device,
            compute_dtype=compute_dtype(self.dtype),
            out_dtype=out_dtype(self.out_dtype),
        )
        try:
            check_base(spec, self.base_model)
        except ValueError as error:
            raise ConfigError(f"{error}; on the command line: --base PATH, in a config: base_model") from None
        return settings


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
    _check_parameters(METHODS[method], parameters, f"{source}: ")
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
            raise ConfigError(f"{where}: per-model parameters are not supported; put them under parameters")
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


def method_parameters(settings: MethodSettings) -> dict[str, Any]:
    """The method's own parameters, defaults resolved; ``rank`` replaces
    ``rank_ratio`` (it overrides it) and unset (None) values are left out."""
    parameters = {key: getattr(settings, key) for key in settings.spec.parameters}
    if parameters.get("rank") is not None:
        parameters.pop("rank_ratio", None)
    return {key: value for key, value in parameters.items() if value is not None}


def engine_parameters(settings: MergeSettings) -> dict[str, Any]:
    """The key filter and SVD engine of ``settings`` (the SVD methods' extra parameters)."""
    key_filter = settings.key_filter
    parameters: dict[str, Any] = {}
    if key_filter.include is not None:
        parameters["include"] = [pattern.pattern for pattern in key_filter.include]
    parameters["exclude"] = [pattern.pattern for pattern in key_filter.exclude]
    parameters["svd"] = settings.svd
    parameters.update({key: value for key in ("niter", "oversample") if (value := getattr(settings, key)) is not None})
    parameters["seed"] = settings.seed
    return parameters


def merge_record(
    models: list[str], base_model: str | None, settings: MethodSettings, version: str | None = None
) -> dict[str, Any]:
    """How a model was merged, as a config that :func:`parse_config` accepts
    (every parameter with its default resolved, so a rerun is identical)."""
    if version is None:
        from . import __version__ as version
    spec, compute = settings.spec, settings.compute
    record: dict[str, Any] = {"merge_method": spec.name, "models": [{"model": str(model)} for model in models]}
    if base_model is not None:
        record["base_model"] = str(base_model)
    record["parameters"] = {**method_parameters(settings), **(engine_parameters(compute) if spec.uses_svd else {})}
    record["dtype"] = dtype_name(compute.compute_dtype)
    if compute.out_dtype is not None:
        record["out_dtype"] = dtype_name(compute.out_dtype)
    record["lowrank_merge_version"] = version
    return record


def record_yaml(record: Mapping[str, Any]) -> str:
    import yaml

    header = "# How this model was merged; rerun with: lowrank-merge merge --config merge_config.yaml OUT\n"
    return header + yaml.safe_dump(dict(record), sort_keys=False, allow_unicode=True)
