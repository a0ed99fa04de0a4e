"""Budget files for `spendgate apply`: read (one file or a folder), checked
against schemas/budgets.schema.json, secret references resolved.

Every error names the file and the key ("budgets.yaml: policies[2].amount:
..."), as a CliError (exit status 1).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from spendgate.cli.client import CliError
from spendgate.visible import visible

KINDS = ("policies", "webhooks", "price_overrides")
SECRET_KEYS = ("url", "secret", "routing_key")
SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_SECRET_FILE_BYTES = 64 * 1024
_REFERENCE = re.compile(r"^\$\{(env|file):([^}]+)\}$")


def schema() -> dict[str, Any]:
    """The JSON Schema of a budgets file (also at schemas/budgets.schema.json)."""
    text = resources.files("spendgate").joinpath("data/budgets.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@dataclass(frozen=True, slots=True)
class Entry:
    """One declared object: its fields as written (references resolved in
    ``secrets``), and where it was declared ("a.yaml: policies[3]")."""

    kind: str
    fields: dict[str, Any]
    where: str
    secrets: dict[str, str] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Declared:
    policies: list[Entry]
    webhooks: list[Entry]
    price_overrides: list[Entry]

    def of(self, kind: str) -> list[Entry]:
        entries: list[Entry] = getattr(self, kind)
        return entries


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def files_of(path: Path) -> list[Path]:
    """``path`` itself, or the budget files under the folder ``path`` (sorted)."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise CliError(f"{path}: no .yaml, .yml or .json file in this folder")
        return found
    if not path.exists():
        raise CliError(f"{path}: no such file or folder")
    return [path]


def key_path(parts: Any) -> str:
    """["policies", 2, "amount"] -> "policies[2].amount"."""
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "(top level)"


def read_file(path: Path) -> dict[str, Any]:
    """One budgets file, parsed and checked against the schema."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CliError(f"{path}: larger than {MAX_FILE_BYTES // 1024 // 1024} MiB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: cannot read: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        raise CliError(f"{path}: not valid YAML: {visible(str(e), 300)}") from None
    if data is None:
        raise CliError(f"{path}: the file is empty (declare at least one of {', '.join(KINDS)})")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise CliError(f"{path}: {key_path(best.absolute_path)}: {visible(best.message, 300)}")
    assert isinstance(data, dict)
    return data


def resolve(value: str, where: str, base: Path) -> str:
    """The secret a ``${env:NAME}`` / ``${file:path}`` reference names."""
    m = _REFERENCE.match(value)
    if m is None:
        return value
    source, name = m.groups()
    if source == "env":
        found = os.environ.get(name)
        if found is None:
            raise CliError(f"{where}: the environment variable {name} is not set")
        if not found:
            raise CliError(f"{where}: the environment variable {name} is empty")
        return found
    file = Path(name).expanduser()
    file = file if file.is_absolute() else base / file
    try:
        if file.stat().st_size > MAX_SECRET_FILE_BYTES:
            raise CliError(f"{where}: {file}: larger than {MAX_SECRET_FILE_BYTES // 1024} KiB")
        secret = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"{where}: cannot read {file}: {e}") from None
    if not secret:
        raise CliError(f"{where}: {file} is empty")
    return secret


def _identity(kind: str, fields: dict[str, Any]) -> str:
    if kind == "price_overrides":
        return " ".join(
            [
                str(fields["model"]).strip().lower(),
                str(fields.get("provider", "")).strip().lower() or "*",
                str(fields.get("route", "")).strip() or "*",
            ]
        )
    return str(fields["name"]).strip()


def identity(entry: Entry) -> str:
    """What apply matches an entry by: its name; for a price override its
    model, provider and route ("*" for any)."""
    return _identity(entry.kind, entry.fields)


def load(path: Path) -> Declared:
    """Every object the file (or the files under the folder) ``path`` declares.
    A name declared twice (in one file or two) is an error naming both places."""
    declared: dict[str, list[Entry]] = {k: [] for k in KINDS}
    seen: dict[tuple[str, str], str] = {}
    for file in files_of(path):
        data = read_file(file)
        for kind in KINDS:
            for i, fields in enumerate(data.get(kind, [])):
                where = f"{file}: {kind}[{i}]"
                key = (kind, _identity(kind, fields))
                if key in seen:
                    what = "name" if kind != "price_overrides" else "model, provider and route"
                    raise CliError(
                        f"{where}: the {what} {key[1]!r} is also declared at {seen[key]}"
                    )
                seen[key] = where
                secrets: dict[str, str] = {}
                references: dict[str, str] = {}
                for name in SECRET_KEYS if kind == "webhooks" else ():
                    if name in fields:
                        secrets[name] = resolve(str(fields[name]), f"{where}.{name}", file.parent)
                        if secrets[name] != fields[name]:
                            references[name] = str(fields[name])
                declared[kind].append(Entry(kind, fields, where, secrets, references))
    return Declared(**declared)
