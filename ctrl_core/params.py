"""params.yaml: load, validate and flatten the run parameters (the schema: ``ctrl_core.config``).

``load`` reads params.yaml and the CLI's ``--set block.key=value`` overrides; ``validate`` raises a
:class:`ParamsError` naming every offending key; ``flatten``/``unflatten`` give the KFP pipeline parameters
(``block__key``) with their types and descriptions, all derived from the config models. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import BLOCKS, Params

__all__ = [
    "BLOCKS",
    "Params",
    "ParamsError",
    "SEP",
    "flatten",
    "from_json",
    "kfp_parameter_types",
    "load",
    "parameter_descriptions",
    "parse_override",
    "unflatten",
    "validate",
]


class ParamsError(ValueError):
    """Invalid parameters; the message names every offending key."""


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        # the models' own rules already name their key with its block (optimize.beta: must be ...)
        lines.append(msg if key and msg.startswith(f"{key}.") else f"{key}: {msg}")
    return "invalid parameters:\n  " + "\n  ".join(lines)


def validate(raw: dict) -> Params:
    """Validate a nested dict; raises ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError("params must be a mapping of blocks (run, checkpoint, model, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format(err)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optimize.beta=0.1' -> (['optimize', 'beta'], 0.1); values are YAML (lists, numbers, booleans)."""
    if "=" not in item:
        raise ParamsError(f"--set {item!r}: expected block.key=value")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ParamsError(f"--set {item!r}: the key must be block.key (e.g. optimize.beta)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"--set {key}: cannot parse value {text!r}: {err}") from None
    return path, value


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read params.yaml (or the defaults when path is None), apply ``--set`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"params file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"{p}: not valid YAML: {err}") from None
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {'.'.join(keys)}: {k} is not a block")
        node[keys[-1]] = value
    return validate(raw)


# --- flat form: KFP pipeline parameters ---------------------------------------------------------------
SEP = "__"


def flatten(params: Params) -> dict[str, Any]:
    """{'optimize__beta': 0.01, ...}: identifiers usable as KFP pipeline parameter names."""
    return {
        f"{block}{SEP}{key}": value
        for block, fields in params.model_dump().items()
        for key, value in fields.items()
    }


def unflatten(flat: dict[str, Any]) -> Params:
    """Inverse of ``flatten``, tolerant of KFP's string-typed values inside dict inputs."""
    raw: dict[str, dict] = {}
    for name, value in flat.items():
        if SEP not in name:
            raise ParamsError(f"{name}: not a block{SEP}key parameter")
        block, key = name.split(SEP, 1)
        raw.setdefault(block, {})[key] = _decode(value)
    return validate(raw)


def from_json(text: str) -> Params:
    """The nested JSON document the pipeline's resolve_params task hands to every step."""
    return validate(json.loads(text))


def _decode(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{" or text in ("true", "false", "null", "None"):
            try:
                return json.loads(text) if text != "None" else None
            except json.JSONDecodeError:
                return value
    return value


def _kfp_type(annotation: Any) -> type:
    """The KFP parameter type of a field: bool, int, float, str (Literal too), list or dict."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin in (list, dict):
        return origin
    return annotation


def kfp_parameter_types() -> dict[str, type]:
    """``block__key`` -> the KFP parameter annotation, from the config's field types."""
    return {
        f"{block}{SEP}{key}": _kfp_type(f.annotation)
        for block, bf in Params.model_fields.items()
        for key, f in bf.annotation.model_fields.items()
    }


def parameter_descriptions() -> dict[str, str]:
    """``block__key`` -> the field's description (the KFP UI shows it next to the parameter)."""
    return {
        f"{block}{SEP}{key}": " ".join(f.description.split())
        for block, bf in Params.model_fields.items()
        for key, f in bf.annotation.model_fields.items()
    }
