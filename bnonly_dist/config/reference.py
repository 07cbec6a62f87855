"""The config reference read from the schema itself: `bnonly config` and docs/config.md.

Each key's documentation lives in config.py (Field descriptions); this module only walks
the schema, so the reference cannot drift from the code (tests/test_config.py compares
docs/config.md with generate_markdown()).
"""
from __future__ import annotations

import json
from typing import Any, NamedTuple

from pydantic import BaseModel

from bnonly_dist.config import Config

DOC_HEADER = """# Config reference

Generated from the schema (`bnonly_dist/config/schema.py`) by
`python -m bnonly_dist.config.reference > docs/config.md`; a test fails when it is stale.
`bnonly config CONFIG [key=value ...]` prints a config resolved, with where each value
came from. Set a key in a YAML file or on the command line as `section.key=value` (the value
is read as YAML: `optim.milestones=[30,60]`, `train.max_steps=null`; numbers as Python reads them,
so `optim.lr=1e-3` is a float). An error names the key, the file and line that set it, and the nearest valid key.

| key | default | meaning |
|---|---|---|
"""


class Key(NamedTuple):
    name: str  # dotted
    default: Any
    description: str
    only_for: tuple[str, ...]  # data sets it applies to (empty: all)


def keys(section: type[BaseModel] = Config, prefix: str = "") -> list[Key]:
    """Every leaf key of the schema in declaration order."""
    out = []
    for name, field in section.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += keys(annotation, f"{prefix}{name}.")
            continue
        extra = field.json_schema_extra or {}
        out.append(Key(f"{prefix}{name}", field.default, field.description or "", tuple(extra.get("only_for", ()))))
    return out


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def generate_markdown() -> str:
    rows = []
    for key in keys():
        scope = f" ({', '.join(key.only_for)} only)" if key.only_for else ""
        rows.append(f"| `{key.name}` | `{_show(key.default)}` | {key.description}{scope} |")
    return DOC_HEADER + "\n".join(rows) + "\n"


def key_list() -> str:
    return "\n".join(f"{key.name:<34} {key.description}" for key in keys())


def resolved(cfg: Config, sources: dict[str, str]) -> str:
    """One block per key: value, where it came from (file, base file, override, default), meaning."""
    flat = {}
    for section, value in cfg.to_dict().items():
        for key, leaf in (value.items() if isinstance(value, dict) else [(None, value)]):
            flat[f"{section}.{key}" if key else section] = leaf
    lines = []
    for key in keys():
        if key.only_for and cfg.data.name not in key.only_for:
            continue  # does not apply to this data set
        source = sources.get(key.name)
        where = f"{source}; default {_show(key.default)}" if source else "default"
        lines.append(f"{key.name} = {_show(flat[key.name])}    [{where}]")
        lines.append(f"    {key.description}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(generate_markdown(), end="")
