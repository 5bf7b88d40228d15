"""Config files: a TOML file read with dotted `section.key=value` overrides (command line > TOML > defaults).

The sections' consumers build their dataclasses with `config.from_section`,
which rejects unknown keys by name; `check_sections` refuses unknown sections.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


def command_line(description: str, argv: list[str], default_config: str | None = None) -> dict:
    """The TOML tree an entry point's `--config FILE [section.key=value ...]` names (load_toml)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=default_config is None, default=default_config)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    return load_toml(args.config, args.overrides)


def load_toml(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Read a TOML file and apply dotted `section.key=value` overrides (command line > TOML).

    Values parse as TOML (`4`, `1.25`, `true`, `"gelu"`); `none` means None
    (e.g. `moe.capacity_factor=none` for dropless); anything else is a string.
    Each override's sections must exist in the file; the consumer of a section
    (`from_section`) rejects unknown keys by name.
    """
    with open(path, "rb") as handle:
        tree = tomllib.load(handle)
    for item in overrides:
        key, sep, raw = item.partition("=")
        *sections, leaf = key.strip().split(".")
        if not sep or not sections or not leaf:
            raise ValueError(f"override {item!r} must look like section.key=value")
        node = tree
        for section in sections:
            if not isinstance(node.get(section), dict):
                raise ValueError(f"override {item!r}: no section {section!r} in {path}")
            node = node[section]
        node[leaf] = _parse_value(raw.strip())
    return tree


def check_sections(tree: dict, known: tuple[str, ...]) -> None:
    """Refuse a TOML tree with a section outside `known`, naming them all."""
    unknown = sorted(set(tree) - set(known))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; known: {', '.join(known)}")


def _parse_value(raw: str) -> object:
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw
