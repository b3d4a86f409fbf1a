"""Opening a page in real headless Chromium (Debian's `chromium`; `.ci/run` installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium() -> str:
    """The browser executable; fails (never skips) the test when it is missing."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "headless Chromium is needed to check the HTML report and was not found on PATH; "
        "install it with: apt-get update && apt-get install -y chromium (.ci/run does this)"
    )


def _run(args: list[str], tmp: Path, name: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{name}"
    command = [chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def page_attributes(page: Path, tmp: Path) -> dict[str, str]:
    """The ``data-*`` attributes of <html> and <body> after the page loaded and its
    scripts ran."""
    done = _run(["--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()], tmp, "dom")
    tags = re.findall(r"<(?:html|body)([^>]*)>", done.stdout)
    assert len(tags) == 2, (
        f"chromium printed no DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    )
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', " ".join(tags)))


def screenshot(page: Path, tmp: Path, size: str = "1200,3000") -> Path:
    out = tmp / "screenshot.png"
    done = _run(
        [f"--screenshot={out}", f"--window-size={size}", page.resolve().as_uri()], tmp, "shot"
    )
    assert out.is_file(), (
        f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}"
    )
    return out
