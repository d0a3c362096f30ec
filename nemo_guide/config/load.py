"""Reading a config: YAML with OmegaConf, ``key=value`` overrides, every problem at once.

``load_config("conf/tiny_cpu.yaml", ["algorithm.group_size=4", ...])`` reads the file,
applies the overrides, maps every section onto its dataclass and validates. All problems
(unknown keys, wrong types, bad values, inconsistent sections) are collected and raised as
one :class:`ConfigError` that names the file and line (or the command-line override) of
each bad value, shows the value, and says the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from nemo_guide.config.sections import SECTIONS, Config, ConfigError


def _yaml_lines(path: Path) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in the YAML file (best effort)."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                lines[dotted] = key.start_mark.line + 1
                walk(value, dotted + ".")

    # Best effort: a file that does not parse is reported by OmegaConf.load with its line.
    with contextlib.suppress(yaml.YAMLError), path.open(encoding="utf-8") as f:
        walk(yaml.compose(f), "")
    return lines


def _yaml_problem(value: str) -> str | None:
    """Why an override's value does not parse as YAML (as OmegaConf reads it), or None."""
    import yaml

    try:
        yaml.safe_load(value)
    except yaml.YAMLError as exc:
        return str(exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else exc).splitlines()[0]
    return None


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check ``value`` against a field annotation; ints widen to floats, lists to tuples."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(annotation):
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin is Literal:
        # any string passes here: the section's choice check reports an unknown one with the valid values
        args = get_args(annotation)
        return value in args or (isinstance(value, str) and all(isinstance(a, str) for a in args)), value
    if origin is tuple:
        args = get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return False, value
        out = []
        for v, a in zip(value, args, strict=True):
            ok, c = _coerce(v, a)
            if not ok:
                return False, value
            out.append(c)
        return True, tuple(out)
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    return True, value


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin is tuple:
        return "a list of " + ", ".join(_type_name(a) for a in get_args(annotation))
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _where(dotted: str, lines: dict[str, int], source: str | None, overridden: set[str]) -> str:
    """Where a key's value comes from: the override that set it, else its line in the file, else
    an override below it (``foo.bar=1`` creates the unknown section ``foo`` on the command line)."""
    if dotted in overridden:
        return f"(command line {dotted}=...) "
    if source and dotted in lines:
        return f"{source}:{lines[dotted]}: "
    below = sorted(o for o in overridden if o.startswith(dotted + "."))
    if below:
        return f"(command line {below[0]}=...) "
    return f"{source}: " if source else ""


def config_from_dict(data: dict[str, Any], *, source: str | None = None, lines: dict[str, int] | None = None, overridden: set[str] | None = None) -> Config:
    """Build and validate a :class:`Config` from nested plain data (every problem at once)."""
    lines = lines or {}
    overridden = overridden or set()
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}"], source)
    for key in data:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), SECTIONS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"sections are {', '.join(SECTIONS)}"
            problems.append(f"{_where(str(key), lines, source, overridden)}unknown section '{key}'; {hint}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name) or {}
        if not isinstance(raw, dict):
            problems.append(f"{_where(name, lines, source, overridden)}section '{name}' must be a mapping, got {raw!r}")
            continue
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            dotted = f"{name}.{key}"
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean '{name}.{close[0]}'?" if close else f"valid keys: {', '.join(sorted(known))}"
                problems.append(f"{_where(dotted, lines, source, overridden)}unknown key '{dotted}'; {hint}")
                continue
            ok, coerced = _coerce(value, hints[key])
            if not ok:
                problems.append(f"{_where(dotted, lines, source, overridden)}{dotted} = {value!r}: expected {_type_name(hints[key])}")
                continue
            kwargs[key] = coerced
        try:
            sections[name] = cls(**kwargs)
        except ConfigError as exc:
            for problem in exc.problems:
                dotted = problem.split(" ", 1)[0].split("=")[0].strip()
                problems.append(_where(dotted, lines, source, overridden) + problem)
    if problems:
        raise ConfigError(problems, source)
    try:
        return Config(**sections)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a directory (the message names its YAML files).
        ConfigError: every problem found, each with its file and line or override.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        pick = f"pick one of its YAML files, e.g. {path / found[0]} ({', '.join(found)})" if found else "it holds no .yaml file"
        raise IsADirectoryError(f"config {path} is a directory, not a YAML file; {pick}")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    source = str(path)
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError([f"{source}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"], source) from None
    try:
        conf = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError carries the line in its message
        raise ConfigError([f"not valid YAML: {exc}"], source) from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([f"override {o!r} is not key=value (e.g. algorithm.group_size=4)" for o in bad], source)
    overridden = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    unparsed = [o for o in overrides if _yaml_problem(o.split("=", 1)[1]) is not None]
    if unparsed:
        raise ConfigError(
            [f"(command line {o}) the value is not valid YAML ({_yaml_problem(o.split('=', 1)[1])}); quote it inside the argument, "
             f"e.g. \"{o.split('=', 1)[0]}='{o.split('=', 1)[1]}'\"" for o in unparsed],
            source,
        )
    try:
        merged = OmegaConf.merge(conf, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError([f"{exc}".splitlines()[0]], source) from None
    return config_from_dict(data, source=source, lines=_yaml_lines(path), overridden=overridden)
