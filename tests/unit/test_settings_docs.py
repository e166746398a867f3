"""README.md's settings table lists exactly the settings the code reads, with their defaults."""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from producers.settings import ProducerSettings
from workers.settings import WorkerSettings

README = Path(__file__).resolve().parents[2] / "README.md"
SETTINGS_HEADING = "## Settings"
SIDES: dict[str, type[BaseSettings]] = {"worker": WorkerSettings, "producer": ProducerSettings}
DEFAULTS_FROM_FACTORIES = {"INFERQ_WORKER_ID": "{hostname}-{pid}"}
"""How the table shows a default computed at run time."""


def env_fields(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, FieldInfo]]:
    """`(INFERQ_X__Y, field)` for every leaf field, recursing into nested models with `__`."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from env_fields(annotation, f"{prefix}{name.upper()}__")
        else:
            yield f"{prefix}{name.upper()}", field


def settings_env_names() -> dict[str, tuple[FieldInfo, set[str]]]:
    """Every settings variable, with its field and the sides (worker, producer) that read it."""
    found: dict[str, tuple[FieldInfo, set[str]]] = {}
    for side, settings_class in SIDES.items():
        prefix = settings_class.model_config.get("env_prefix", "")
        assert settings_class.model_config.get("env_nested_delimiter") == "__"
        for env_name, field in env_fields(settings_class, prefix):
            found.setdefault(env_name, (field, set()))[1].add(side)
    return found


def documented_rows() -> dict[str, list[str]]:
    """The settings table of README.md: variable name → its other cells."""
    text = README.read_text(encoding="utf-8")
    assert SETTINGS_HEADING in text, f"README.md has no {SETTINGS_HEADING!r} section"
    section = text.split(SETTINGS_HEADING, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\|\s*`(INFERQ_[A-Z0-9_]+)`\s*\|(.*)\|", line.strip())
        if match:
            name, rest = match.groups()
            assert name not in rows, f"{name} appears twice in the settings table"
            rows[name] = [cell.strip() for cell in rest.split("|")]
    return rows


def shown_default(env_name: str, field: FieldInfo) -> str:
    """How the table writes a field's default."""
    if field.default_factory is not None:
        return f"`{DEFAULTS_FROM_FACTORIES[env_name]}`"
    value = field.default
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        value = str(value).lower()  # as an environment variable is written
    return f"`{value}`"


SETTINGS = settings_env_names()
ROWS = documented_rows()
LEAF_SETTINGS = sorted(
    name
    for name, (field, _) in SETTINGS.items()
    if field.default_factory is None or name in DEFAULTS_FROM_FACTORIES
)


def test_every_setting_is_in_the_readme_table() -> None:
    missing = sorted(set(SETTINGS) - set(ROWS))
    assert not missing, f"add these to README.md's settings table: {missing}"


def test_the_readme_table_lists_no_setting_the_code_lacks() -> None:
    stale = sorted(set(ROWS) - set(SETTINGS))
    assert not stale, f"README.md documents settings no settings class has: {stale}"


def test_nested_connection_settings_are_walked() -> None:
    assert "INFERQ_KAFKA__BOOTSTRAP_SERVERS" in SETTINGS
    assert "INFERQ_REDIS__URL" in SETTINGS
    assert "INFERQ_KAFKA" not in SETTINGS


@pytest.mark.parametrize("env_name", LEAF_SETTINGS)
def test_the_documented_default_is_the_fields_default(env_name: str) -> None:
    field, _ = SETTINGS[env_name]
    assert ROWS[env_name][0] == shown_default(env_name, field)


@pytest.mark.parametrize("env_name", sorted(SETTINGS))
def test_the_documented_sides_are_the_classes_that_read_it(env_name: str) -> None:
    _, sides = SETTINGS[env_name]
    documented = {side.strip() for side in ROWS[env_name][1].split(",")}
    assert documented == sides


@pytest.mark.parametrize("env_name", sorted(SETTINGS))
def test_every_setting_has_a_meaning(env_name: str) -> None:
    assert len(ROWS[env_name]) == 3
    assert ROWS[env_name][2], f"{env_name} has an empty meaning cell"
