"""Reading a config: YAML files (with their `base:` chain) and key=value overrides into a Config.

A config file may name a `base:` file (relative to itself) that it extends; mappings are
merged key by key. Overrides are `dotted.key=value` with the value parsed as YAML, so
`optim.lr=0.2`, `mode=bn`, `optim.milestones=[30,60]` and `train.max_steps=null` work.
Numbers read as a Python user writes them: `1e30` and `1e-4` are floats (YAML 1.1 wants
`1.0e+30`). An error names the key, the file and line it was set in, and the nearest valid key.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bnonly_dist.config.schema import Config, ConfigError


class Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader that also reads exponent numbers without a dot (1e30, 5E-4) as floats."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)"
                                                                   r"[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_mapping(path: Path, missing: str) -> dict:
    """A YAML file holding a mapping (empty file: {}); ConfigError naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(missing)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror}); fix its permissions") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({what}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of keys, not {type(data).__name__}")
    return data


def read_run_config(path: Path, missing: str | None = None) -> dict:
    """The mapping in a run's saved config.yaml, the one reader of it (rundir, eval, analysis).

    The empty-file rule, decided here: a run always writes its whole config, so an empty
    config.yaml is damaged, like one that does not parse (unlike a user's YAML, where
    read_mapping takes empty as {}). ConfigError naming the file either way.
    """
    data = read_mapping(path, missing or f"{path} does not exist; pass the directory of a run (bnonly train wrote it)")
    if not data:
        raise ConfigError(f"{path}: empty (a run writes its whole config there); restore it from a copy")
    return data


def leaves(data: dict, prefix: str = ""):
    """The dotted keys of a nested mapping's values (a list counts as one value)."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from leaves(value, dotted + ".")
        else:
            yield dotted


def key_lines(path: Path) -> dict[str, int]:
    """The line (1-based) of every dotted key in a YAML file, sections included; {} if it cannot be read."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.value if isinstance(node, yaml.MappingNode) else ():
            dotted = f"{prefix}{key.value}"
            lines[dotted] = key.start_mark.line + 1
            walk(value, dotted + ".")
    walk(root, "")
    return lines


def _shown_path(path: Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def where_set(key: str, files: dict[str, Path]) -> str:
    """' in FILE line N' for the file that set key (or a key under it), else ''."""
    setter = next((k for k in files if k == key or k.startswith(key + ".")), None)
    if setter is None:
        return ""
    line = key_lines(files[setter]).get(key)
    return f" in {_shown_path(files[setter])}" + (f" line {line}" if line else "")


# Where configs/ lies in this project: named when a copied config's relative `base:` no longer resolves.
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _base_path(path: Path, base) -> Path:
    """The file `base:` names, relative to path; ConfigError naming the key, its line and where it was resolved."""
    resolved = path.parent / str(base)
    if resolved.is_file():
        return resolved
    line = key_lines(path).get("base")
    at = f"{path}" + (f" line {line}" if line else "")
    shipped = CONFIGS / str(base)
    fix = (f"write base: {shipped} (the project's file), or copy the base file next to it" if shipped.is_file()
           else "point it at an existing file")
    raise ConfigError(f"{at}: base: {base} resolves to {resolved.resolve()}, which does not exist (a base: path is "
                      f"relative to the file that names it, here {path.parent}); {fix}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = (), sources: dict | None = None,
               files: dict | None = None) -> dict:
    """The file merged over its `base:` chain; sources (if given) gets where each key came from ("file X",
    "base X"), files the path of that file."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base files form a cycle; remove the loop of `base:` keys")
    data = read_mapping(path, f"config file {path} does not exist; pass a path to a YAML file in configs/")
    base = data.pop("base", None)
    merged = data if base is None else _merge(_read_yaml(_base_path(path, base), seen + (path,), sources, files), data)
    for key in leaves(data):
        if sources is not None:
            sources[key] = f"{'base ' if seen else 'file '}{_shown_path(path)}"
        if files is not None:
            files[key] = path
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. optim.lr=0.2")
    key, raw = text.split("=", 1)
    if not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(f"override {text!r} has a malformed key; write e.g. optim.lr=0.2")
    try:
        value = parse_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def parse_args(parser, argv=None):
    """parser.parse_args for commands taking `overrides`, which may also follow the options."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _key(loc: tuple) -> str:
    """The dotted config key of an error location (without list indices or union member tags)."""
    section, parts = Config, []
    for part in loc:
        fields = getattr(section, "model_fields", {})
        if part not in fields:
            break
        parts.append(part)
        section = fields[part].annotation
    return ".".join(parts) or str(loc[0])


def valid_keys() -> list[str]:
    """Every dotted config key and section name."""
    keys = list(leaves(Config().to_dict()))
    return keys + sorted({k.split(".")[0] for k in keys if "." in k})


def _nearest(key: str) -> str:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _describe(err: ValidationError, files: dict[str, Path]) -> str:
    first = err.errors()[0]
    if not first["loc"]:  # a check across sections: its message names the keys
        return first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        key = ".".join(str(p) for p in first["loc"])
        return (f"unknown config key '{key}'{where_set(key, files)}{_nearest(key)} (`bnonly config --keys` lists "
                "every key)")
    key = _key(first["loc"])
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    where = where_set(key, files)
    return f"config key '{key}'{where}: {first['msg']}{shown}; fix it {'there' if where else 'in the YAML'} or with {key}=..."


def from_dict(data: dict, files: dict[str, Path] | None = None) -> Config:
    """The validated Config; files (key -> the YAML file that set it) lets an error name its file and line."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, files or {})) from None


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    return load_with_sources(path, overrides)[0]


def load_with_sources(path: str | Path | None, overrides: list[str] = ()) -> tuple[Config, dict[str, str]]:
    """The config and, per dotted key set anywhere, where it was set: a file's path or "override"."""
    sources: dict[str, str] = {}
    files: dict[str, Path] = {}
    data = _read_yaml(Path(path), sources=sources, files=files) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        sources[key] = "override"
        files = {k: v for k, v in files.items() if k != key and not k.startswith(key + ".")}
    return from_dict(data, files), sources


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_saved_dict(), sort_keys=False))
