"""The alert rules the docs state are the ones `AlertConfig()` runs.

docs/definitions.md §6 has one table row per rule (name, what it judges, on by default,
its settings with their defaults) and a table of the shared settings; docs/monitor.md
has a shorter table of the same rules. Every value is read from `AlertConfig()`, never
written here, so a change of the defaults fails this test until the tables say the same.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from redundancy_monitor.monitoring import alerts
from redundancy_monitor.monitoring.alerts import RULES, AlertConfig

ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS = ROOT / "docs" / "definitions.md"
MONITOR = ROOT / "docs" / "monitor.md"
SETTING = re.compile(r"`([a-z_]+)\s*=\s*([^`]+)`")


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of `text` as rows of cells (header and rule lines dropped)."""
    out, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            current.append(cells)
        elif current:
            out.append(current[2:])  # header, then |---|
            current = []
    return out


def table_with(text: str, header_first_cell: str, expect: str) -> list[list[str]]:
    """The table whose rows mention `expect` in their first cell."""
    for rows in tables(text):
        if rows and any(r[0].strip("`") == expect for r in rows):
            return rows
    raise AssertionError(f"no table with a {header_first_cell} row {expect!r}")


def settings(cell: str) -> list[tuple[str, object]]:
    """The `name = value` settings of a cell, values as Python literals."""
    found = []
    for name, value in SETTING.findall(cell):
        try:
            found.append((name, ast.literal_eval(value.strip())))
        except (ValueError, SyntaxError):
            pytest.fail(f"setting `{name} = {value}` is not a Python literal")
    return found


DEFAULTS = AlertConfig()
FIELDS = {f.name for f in dataclasses.fields(AlertConfig)}


def six() -> str:
    return section(DEFINITIONS.read_text(encoding="utf-8"), "## 6. During training")


def test_definitions_lists_every_rule_once_with_its_default_settings():
    rows = table_with(six(), "rule", RULES[0])
    named = [r[0].strip("`") for r in rows]
    assert sorted(named) == sorted(RULES), (
        f"docs/definitions.md §6 lists {named}; the engine's rules are {list(RULES)}"
    )
    wrong = []
    for row in rows:
        rule, on_by_default, cell = row[0].strip("`"), row[2], row[3]
        documented = settings(cell)
        assert documented, f"rule {rule}: no `name = value` settings in {cell!r}"
        for name, value in documented:
            if name not in FIELDS:
                wrong.append(f"{rule}: `{name}` is not an AlertConfig field")
            elif getattr(DEFAULTS, name) != value or type(getattr(DEFAULTS, name)) is not type(
                value
            ):
                wrong.append(
                    f"{rule}: `{name} = {value!r}`, AlertConfig() has {getattr(DEFAULTS, name)!r}"
                )
        switch = getattr(DEFAULTS, documented[0][0], None)
        on = switch is not None and switch is not False
        if on_by_default not in ("on", "off"):
            wrong.append(f"{rule}: 'on by default' says {on_by_default!r}, not on/off")
        elif (on_by_default == "on") != on:
            wrong.append(
                f"{rule}: documented {on_by_default} by default, but AlertConfig()."
                f"{documented[0][0]} = {switch!r}"
            )
    assert not wrong, "docs/definitions.md §6 disagrees with AlertConfig():\n" + "\n".join(wrong)


def test_every_alert_config_field_is_documented_in_definitions():
    text = six()
    rule_rows = table_with(text, "rule", RULES[0])
    shared_rows = table_with(text, "setting", "hysteresis")
    documented = {name for row in rule_rows for name, _ in settings(row[3])}
    wrong = []
    for row in shared_rows:
        name, value = row[0].strip("`"), ast.literal_eval(row[1].strip("`"))
        documented.add(name)
        if name not in FIELDS or getattr(DEFAULTS, name) != value:
            wrong.append(f"{name} = {value!r}: AlertConfig() has {getattr(DEFAULTS, name, '?')!r}")
    assert not wrong, "docs/definitions.md §6 shared settings: " + "; ".join(wrong)
    assert documented == FIELDS, (
        f"AlertConfig fields not in §6: {sorted(FIELDS - documented)}; "
        f"documented but not fields: {sorted(documented - FIELDS)}"
    )


def test_monitor_page_lists_the_same_rules_and_defaults():
    text = section(MONITOR.read_text(encoding="utf-8"), "## Alerts")
    rows = table_with(text, "rule", RULES[0])
    assert sorted(r[0].strip("`") for r in rows) == sorted(RULES)
    wrong = [
        f"{row[0]}: `{name}={value!r}`, AlertConfig() has {getattr(DEFAULTS, name, '?')!r}"
        for row in rows
        for name, value in settings(row[-1])
        if name not in FIELDS or getattr(DEFAULTS, name) != value
    ]
    assert not wrong, "docs/monitor.md's alert table disagrees with AlertConfig():\n" + "\n".join(
        wrong
    )


def test_every_rule_the_engine_fires_is_in_rules():
    source = Path(alerts.__file__).read_text(encoding="utf-8")
    fired = set(re.findall(r'_update\(\s*"(\w+)"', source))
    assert fired <= set(RULES), f"rules fired but not in RULES: {sorted(fired - set(RULES))}"


def test_the_table_parser_reads_what_it_should():
    rows = tables('| a | b |\n|---|---|\n| `x` | `y = 0.10`, `z=None` and `w = "s"` |\n')
    assert rows == [[["`x`", '`y = 0.10`, `z=None` and `w = "s"`']]]
    assert settings(rows[0][0][1]) == [("y", 0.10), ("z", None), ("w", "s")]
    escaped = tables("| a | b |\n|--|--|\n| `p \\| q` | e |\n")
    assert escaped == [[["`p | q`", "e"]]]
