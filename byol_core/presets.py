"""Build a JobSpec from presets (data in presets.toml), a spec document and --set overrides.

Resolution order, later wins: JobSpec defaults < base < variant < document < overrides.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from byol_core.errors import ByolError
from byol_core.spec import JobSpec

DEFAULT_BASE = "cpu"
DEFAULT_VARIANT = "byol"


class SpecError(ByolError, ValueError):
    """A spec that cannot be built; the message names the offending field."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: dict[str, Any]


@cache
def preset_tables() -> dict[str, Any]:
    """presets.toml as it is (bases, variants, reproductions, variant groups)."""
    return tomllib.loads(resources.files("byol_core").joinpath("presets.toml").read_text())


@cache
def _presets() -> dict[str, dict[str, Preset]]:
    raw = preset_tables()
    return {
        kind: {
            name: Preset(name, entry.get("description", ""), entry.get("spec", {}))
            for name, entry in raw[kind].items()
        }
        for kind in ("bases", "variants")
    }


def bases() -> dict[str, Preset]:
    return _presets()["bases"]


def variants() -> dict[str, Preset]:
    return _presets()["variants"]


def deep_merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into a copy of ``into``; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(into)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(item: str) -> tuple[list[str], Any]:
    """``optim.lr=0.4`` -> (['optim', 'lr'], 0.4). Values are YAML: numbers, bools, lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {item!r}: value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def nest(path: list[str], value: Any) -> dict[str, Any]:
    for part in reversed(path):
        value = {part: value}
    return value


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each starting with the field's dotted path."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        show_input = err["type"] not in ("extra_forbidden", "missing") and not isinstance(
            err["input"], dict
        )
        got = f" (got {err['input']!r})" if show_input else ""
        lines.append(f"{loc}: {msg}{got}")
    return "; ".join(lines)


def resolve_spec(
    document: dict[str, Any] | None = None,
    *,
    base: str | None = None,
    variant: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> JobSpec:
    """Build and validate a JobSpec. ``base``/``variant`` arguments win over the document's."""
    if document is not None and not isinstance(document, dict):
        raise SpecError("spec: a spec document must be a mapping of fields")
    doc = dict(document or {})
    base_name = base or doc.get("base") or DEFAULT_BASE
    variant_name = variant or doc.get("variant") or DEFAULT_VARIANT
    if base_name not in bases():
        raise SpecError(f"base: unknown preset base {base_name!r}; one of {sorted(bases())}")
    if variant_name not in variants():
        raise SpecError(f"variant: unknown variant {variant_name!r}; one of {sorted(variants())}")
    merged = deep_merge(bases()[base_name].overrides, variants()[variant_name].overrides)
    merged = deep_merge(merged, doc)
    for item in overrides:
        path, value = parse_set(item)
        merged = deep_merge(merged, nest(path, value))
    merged["base"], merged["variant"] = base_name, variant_name
    merged.setdefault("name", f"{base_name}-{variant_name}")
    try:
        return JobSpec.model_validate(merged)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


def load_document(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON spec file (JSON is YAML)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {str(p)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {str(p)!r} is not valid YAML/JSON: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SpecError(f"spec file {str(p)!r} must hold a mapping of fields")
    return doc
