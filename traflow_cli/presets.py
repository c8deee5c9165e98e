"""Find presets, load their TOML, apply `--set section.key=value`, validate once.

No torch here (see specs.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib

from traflow_cli.specs import RunSpec, SpecError, build_spec

DEFAULT_PRESET = "toy2d"


def preset_dirs() -> list[Path]:
    """Where named presets live: inside an installed wheel, or at the repository's top level."""
    here = Path(__file__).resolve().parent
    return [p for p in (here / "presets", here.parent / "presets") if p.is_dir()]


def available_presets() -> list[str]:
    return sorted({p.stem for d in preset_dirs() for p in d.glob("*.toml")})


def preset_path(name: str) -> Path:
    """A preset name (toy2d) or a path to a TOML file."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise SpecError(f"--preset: no preset file at {name!r}")
        return path
    for folder in preset_dirs():
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    raise SpecError(f"--preset: unknown preset {name!r}; choose from "
                    f"{', '.join(available_presets())} or give a .toml file")


def load_preset(name: str) -> dict[str, Any]:
    """A named preset, a TOML file, or the resolved spec of an existing run folder."""
    record = Path(name) / "spec.json"
    if record.is_file():
        return json.loads(record.read_text())["spec"]
    path = preset_path(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"--preset: {path} is not valid TOML: {exc}") from None
    raw.setdefault("preset", name if not name.endswith(".toml") else path.stem)
    return raw


def parse_value(text: str) -> Any:
    """A TOML value (1, 0.5, true, [1, 2], "x"); anything else is taken as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {assignment!r}: expected section.key=value, e.g. sample.nfe=2")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = parse_value(value.strip())


def assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set one field to an exact value (from a typed command-line flag: no parsing)."""
    *sections, key = dotted.split(".")
    node = raw
    for part in sections:
        node = node.setdefault(part, {})
    node[key] = value


def resolve_spec(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None,
                 values: dict[str, Any] | None = None) -> RunSpec:
    """Preset, then typed flag values, then `--set` overrides in order; validated once."""
    raw = load_preset(preset)
    for dotted, value in (values or {}).items():
        if value is not None:
            assign(raw, dotted, value)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return build_spec(raw)
