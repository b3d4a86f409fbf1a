"""The documentation stays true to the repository: links resolve, the README stays a
short front page, nothing points outside the repository, and what the docs cite exists."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024
DEFINITION_SECTIONS = (
    "1. Objects",
    "2. Distances",
    "3. Pair sets",
    "4. Summary of one probe",
    "5. Removal guidance",
    "6. During training",
)

LINK = re.compile(r"(?<!\\)\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown page outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch in "-_ " or category[0] in "LN" or category == "Mn":
            kept.append("-" if ch == " " else ch)
    return "".join(kept)


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = "\n".join(prose_lines(page.read_text(encoding="utf-8")))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return LINK.findall(text)


def test_slug_follows_github_rules():
    assert slug("6. During training") == "6-during-training"
    assert slug("Scoring a saved checkpoint: `redundancy-monitor score`") == (
        "scoring-a-saved-checkpoint-redundancy-monitor-score"
    )
    assert slug("Properties (hypothesis)") == "properties-hypothesis"
    assert slug("What happens when...") == "what-happens-when"
    assert slug("How the engine is fast, and how we know it is right") == (
        "how-the-engine-is-fast-and-how-we-know-it-is-right"
    )


def test_the_docs_folder_holds_the_pages_the_readme_promises():
    names = {p.name for p in PAGES}
    expected = {"definitions.md", "monitor.md", "multi-rank.md", "cli.md", "engine.md"}
    assert expected | {"faults.md", "layout.md", "README.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: {destination} does not exist")
            continue
        if not destination.is_relative_to(ROOT):
            broken.append(f"{target}: points outside the repository")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with anchor #{anchor} in {destination.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_links_are_found_by_the_link_pattern():
    # The link test is only as good as its pattern: it must see the README's links.
    targets = links(ROOT / "README.md")
    assert "docs/definitions.md" in targets
    assert "docs/gap_trajectory.png" in targets


def test_readme_is_a_short_front_page():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/"


def test_definitions_sections_are_numbered_as_the_code_cites_them():
    headings = [
        m.group(2)
        for line in prose_lines((ROOT / "docs" / "definitions.md").read_text(encoding="utf-8"))
        if (m := HEADING.match(line)) and m.group(1) == "##"
    ]
    assert tuple(headings[: len(DEFINITION_SECTIONS)]) == DEFINITION_SECTIONS


def test_every_section_the_code_cites_exists():
    text = "\n".join(
        p.read_text(encoding="utf-8")
        for folder in ("redundancy_monitor", "tests", "benchmarks", "examples")
        for p in (ROOT / folder).rglob("*.py")
    )
    cited = set()
    for match in re.finditer(r"docs/definitions\.md\s*§\s*([\d,\s\-–]+)", text):
        for number in re.findall(r"\d+", match.group(1)):
            cited.add(int(number))
    numbered = {
        int(m.group(1))
        for line in prose_lines((ROOT / "docs" / "definitions.md").read_text(encoding="utf-8"))
        if (m := re.match(r"^## (\d+)\. ", line))
    }
    assert cited, "no docstring cites docs/definitions.md §N; the pattern is stale"
    assert cited <= numbered, f"cited sections {sorted(cited - numbered)} do not exist"


def test_nothing_in_the_repository_points_outside_it():
    # The pattern is assembled so that this file does not match itself.
    pattern = "|".join([r"\.\./shared", "SPEC [0-9]", r"SPEC\.md"])
    found = subprocess.run(
        ["git", "grep", "-n", "-I", "-E", pattern],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode in (0, 1), found.stderr  # 1: no match
    assert found.stdout == "", "text refers to a document users never get:\n" + found.stdout


def test_tests_named_in_the_docs_exist():
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for path, name in re.findall(r"`((?:faults/)?test_\w+\.py)(?:::(\w+))?", text):
            source = ROOT / "tests" / path
            if not source.is_file():
                missing.append(f"{page.name}: tests/{path}")
            elif name and not re.search(rf"def {name}\(", source.read_text(encoding="utf-8")):
                missing.append(f"{page.name}: tests/{path}::{name}")
    assert not missing, "the docs name tests that do not exist: " + ", ".join(missing)


def resolves(dotted: str) -> bool:
    """Whether `a.b.c` names a module, or an attribute reached from the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(target, name):
                return False
            target = getattr(target, name)
        return True
    return False


def code_names(text: str) -> set[str]:
    """Package names the page uses: imports and `rm.` calls in Python examples, dotted
    names in code spans."""
    names = set()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for module, wrapped, one_line in re.findall(
            r"^from (redundancy_monitor[\w.]*) import (?:\(([^)]*)\)|([^\n]+))", block, flags=re.M
        ):
            imported = (wrapped or one_line).split("#")[0]
            names |= {f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()}
        if "import redundancy_monitor as rm" in block:
            names |= {f"redundancy_monitor.{n}" for n in re.findall(r"\brm\.(\w+)", block)}
    for span in re.findall(r"`([^`\n]+)`", text):
        names |= set(re.findall(r"\bredundancy_monitor(?:\.\w+)+", span))
    return names


def test_package_names_in_the_docs_exist():
    missing = sorted(
        f"{page.name}: {name}"
        for page in PAGES
        for name in code_names(page.read_text(encoding="utf-8"))
        if not resolves(name)
    )
    assert not missing, "the docs name things the package does not have: " + ", ".join(missing)


def test_package_names_are_found_in_the_docs():
    names = code_names((ROOT / "docs" / "engine.md").read_text(encoding="utf-8"))
    assert "redundancy_monitor.probe" in names  # from `rm.probe(...)`
    assert "redundancy_monitor.probing.reference.reference_distances" in names
    assert not resolves("redundancy_monitor.probing.no_such_module")
    assert not resolves("redundancy_monitor.probing.engine.no_such_name")


def test_source_paths_in_the_docs_exist():
    missing = sorted(
        f"{page.name}: {path}"
        for page in PAGES
        for path in re.findall(
            r"`((?:redundancy_monitor|tests|benchmarks|examples)/[\w/.-]*\w)`",
            page.read_text(encoding="utf-8"),
        )
        if not (ROOT / path).exists()
    )
    assert not missing, "the docs name files that do not exist: " + ", ".join(missing)


def test_the_readme_figure_script_draws_a_png_from_a_record_file(tmp_path):
    pytest.importorskip("matplotlib")
    summary = {"d_repl_mean": 0.2, "d_int_mean": 0.1, "gap_mean": 0.1, "gap_median": None}
    records = [
        {"type": "probe", "step": step, "result": {"summary": dict(summary, gap_max=step / 10)}}
        for step in (0, 8, 16)
    ]
    records.append({"type": "alert", "step": 16, "rule": "gap_growth", "message": "m"})
    run = tmp_path / "run" / "version_0"
    run.mkdir(parents=True)
    (run / "redundancy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "figure.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plot_trajectory.py"), str(tmp_path), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "redundancy.jsonl" in done.stdout

    (tmp_path / "other.jsonl").write_text("")
    ambiguous = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plot_trajectory.py"), str(tmp_path), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ambiguous.returncode != 0 and "found 2" in ambiguous.stderr
