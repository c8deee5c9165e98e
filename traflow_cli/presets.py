"""Find presets, load their TOML, apply `--set section.key=value`, validate once.

No torch here (see specs.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomllib

from traflow_cli.errors import one_line
from traflow_cli.runfolder import require_run
from traflow_cli.specs import (
    TRAFLOW_FIELDS,
    RunSpec,
    SpecError,
    build_spec,
    check_teacher_run,
    is_toy_data,
    move_traflow_fields,
)

DEFAULT_PRESET = "toy2d"


def preset_dirs() -> list[Path]:
    """Where named presets live: inside an installed wheel, or at the repository's top level."""
    here = Path(__file__).resolve().parent
    return [p for p in (here / "presets", here.parent / "presets") if p.is_dir()]


def available_presets() -> list[str]:
    return sorted({p.stem for d in preset_dirs() for p in d.glob("*.toml")})


def preset_path(name: str) -> Path:
    """A preset name (toy2d) or a path to a TOML file. A preset's name wins over a folder of
    the same name in the working directory (a run folder called toy2d, say)."""
    if not name.endswith(".toml") and "/" not in name:
        for folder in preset_dirs():
            if (folder / f"{name}.toml").is_file():
                return folder / f"{name}.toml"
    if Path(name).is_dir():
        raise SpecError(f"--preset: {name!r} is a folder, not a preset; give a preset name "
                        f"({', '.join(available_presets())}) or a .toml file (a command that "
                        "takes a run folder starts from that folder's own spec)")
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise SpecError(f"--preset: no preset file at {name!r}")
        return path
    raise SpecError(f"--preset: unknown preset {name!r}; choose from "
                    f"{', '.join(available_presets())} or give a .toml file")


def load_preset(name: str) -> dict[str, Any]:
    """A named preset or a TOML file, as a spec dict not yet validated (a run folder's spec is
    read by load_run_spec)."""
    path = preset_path(name)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise SpecError(f"--preset: {path} is not a text file (TOML must be UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"--preset: {path} is not valid TOML: {one_line(exc)}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise SpecError(f"--preset: {path} nests arrays or tables too deeply to be a preset; "
                        "fix the file") from None
    except OSError as exc:
        raise SpecError(f"--preset: cannot read {path} ({one_line(exc.strerror or exc)})") from None
    raw.setdefault("preset", name if not name.endswith(".toml") else path.stem)
    return raw


def load_run_spec(run_dir: str | Path, flag: str, *, jobs: tuple[str, ...] | None = None
                  ) -> dict[str, Any]:
    """The resolved spec of an existing run folder (passed as `flag`), or a one-line error."""
    return copy.deepcopy(require_run(Path(run_dir), flag, jobs=jobs)["spec"])


def parse_value(text: str) -> Any:
    """A TOML value (1, 0.5, true, [1, 2], "x"); anything else is taken as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # a string, or nested past any field
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` in place."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {assignment!r}: expected section.key=value, e.g. sample.nfe=2")
    parts = section_path(key.strip().split("."))
    node = raw
    for part in parts[:-1]:
        child = _subsection(node, part)
        if not isinstance(child, dict):
            raise SpecError(f"--set {assignment!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = parse_value(value.strip())


def _subsection(node: dict[str, Any], part: str) -> Any:
    """node[part], made an empty section where absent or recorded as None (a method's section
    left out, e.g. distill.ctm in a TraFlow run's spec.json)."""
    child = node.get(part)
    if child is None:
        child = node[part] = {}
    return child


def assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set one field to an exact value (from a typed command-line flag: no parsing)."""
    *sections, key = section_path(dotted.split("."))
    node = raw
    for part in sections:
        node = _subsection(node, part)
    node[key] = value


def section_path(parts: list[str]) -> list[str]:
    """TraFlow's fields by their older names (distill.w_vel) go to distill.traflow."""
    if len(parts) == 2 and parts[0] == "distill" and parts[1] in TRAFLOW_FIELDS:
        return ["distill", "traflow", parts[1]]
    return parts


def merge_sources(raw: dict[str, Any], overrides: list[str] | None = None,
                  values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Typed flag values, then `--set` overrides in order, applied to a preset's dict in place.

    A preset or run spec carries TraFlow's settings (distill.traflow) as the default method's;
    when the command chooses another method they are left out, so `--set distill.method=ctm`
    works on any preset. A TraFlow setting the command itself makes there is one line.
    """
    distill = raw.get("distill")
    if isinstance(distill, dict):
        try:  # older flat names kept whatever the base's method: the command may change it
            raw["distill"] = move_traflow_fields(distill, keep=True)
        except ValueError as err:
            raise SpecError(str(err)) from None
    keys = [dotted for dotted, value in (values or {}).items() if value is not None]
    keys += [assignment.partition("=")[0].strip() for assignment in overrides or []]
    for dotted, value in (values or {}).items():
        if value is not None:
            assign(raw, dotted, value)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    distill = raw.get("distill")
    method = distill.get("method", "traflow") if isinstance(distill, dict) else "traflow"
    if method != "traflow" and isinstance(distill, dict):
        for key in keys:
            if section_path(key.split("."))[:2] == ["distill", "traflow"]:
                raise SpecError(f"{key}: a TraFlow setting (distill.traflow), but "
                                f"distill.method is {method!r}; drop it, or choose "
                                "distill.method=traflow")
        distill.pop("traflow", None)
    return raw


def resolve_spec(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None,
                 values: dict[str, Any] | None = None) -> RunSpec:
    """Preset, then typed flag values, then `--set` overrides in order; validated once."""
    return build_spec(merge_sources(load_preset(preset), overrides, values))


def resolve_with_teacher(preset: str | None, overrides: list[str] | None = None,
                         values: dict[str, Any] | None = None, *,
                         teacher: str | None = None, flag: str = "distill.teacher") -> RunSpec:
    """A spec whose network is its teacher's, resolved before validation (and any dry run).

    The student copies its teacher's network, so the teacher run's recorded `net` replaces the
    preset's. Without --preset the teacher run's own spec is the base. A `--set net.*` that
    contradicts the teacher is refused: it would otherwise be shown and then silently dropped.
    """
    record = check_teacher_run(teacher, flag) if teacher is not None else None
    raw = load_preset(preset) if preset or record is None else copy.deepcopy(record["spec"])
    raw = merge_sources(raw, overrides, values)
    if record is None:
        return build_spec(raw)
    net = record["spec"].get("net")
    if not isinstance(net, dict):
        raise SpecError(f"--teacher: {teacher}/spec.json records no network; re-import or retrain "
                        "the teacher")
    for dotted, value in _net_requests(overrides, values):
        key = dotted.removeprefix("net.")
        if key not in net:
            raise SpecError(f"{dotted}: not a field of the teacher's network (kind "
                            f"{net.get('kind')!r} in {teacher}); the student takes its teacher's "
                            "network: drop this --set")
        if _same(net[key], value):
            continue
        raise SpecError(f"{dotted}: {value!r} differs from the teacher's network ({key} = "
                        f"{net[key]!r} in {teacher}); the student takes its teacher's network: "
                        "drop this --set")
    toy_data = is_toy_data(raw.get("data"))
    if toy_data != (net.get("kind") == "mlp"):
        kinds = ("toy 2-D", "an image") if toy_data else ("image", "a toy 2-D")
        raise SpecError(f"--preset: {raw.get('preset', preset)!r} is for {kinds[0]} data but the "
                        f"teacher in {teacher} is {kinds[1]} network ({net.get('kind')}); pass "
                        f"the preset it was made with (--preset "
                        f"{record['spec'].get('preset', '?')}), or leave --preset out")
    raw["net"] = copy.deepcopy(net)
    size = net.get("image_size")
    if size is not None:  # the teacher's network fixes the resolution its data must have
        asked = dict(_requests(overrides, values, "data.resolution"))
        if asked and asked["data.resolution"] != size:
            raise SpecError(f"data.resolution: {asked['data.resolution']!r} differs from the "
                            f"teacher's image size ({size} in {teacher}); drop this --set")
        raw.setdefault("data", {})["resolution"] = size
    return build_spec(raw)


def _requests(overrides: list[str] | None, values: dict[str, Any] | None,
              prefix: str) -> list[tuple[str, Any]]:
    """The (dotted key, value) pairs under `prefix` a command line asks for, parsed as --set
    parses them, in the order they apply."""
    def wanted(key: str) -> bool:
        return key == prefix or key.startswith(prefix + ".")

    asked = [(k, v) for k, v in (values or {}).items() if wanted(k) and v is not None]
    for assignment in overrides or []:
        key, sep, value = assignment.partition("=")
        if sep and wanted(key.strip()):
            asked.append((key.strip(), parse_value(value.strip())))
    return asked


def _net_requests(overrides: list[str] | None,
                  values: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The (`net.key`, value) pairs a command line asks for; a whole `net=` is refused."""
    asked = _requests(overrides, values, "net")
    for key, _ in asked:
        if key == "net":
            raise SpecError("--set net=...: the student takes its teacher's network; drop this "
                            "--set")
    return asked


def _same(recorded: Any, asked: Any) -> bool:
    """A recorded JSON value equals a requested one (tuples and lists alike, 1 and 1.0 alike)."""
    if isinstance(recorded, list | tuple) and isinstance(asked, list | tuple):
        return len(recorded) == len(asked) and all(map(_same, recorded, asked))
    return recorded == asked and isinstance(recorded, bool) == isinstance(asked, bool)
