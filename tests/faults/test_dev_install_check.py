"""`./dev` installs when the interpreter it will run lacks the project, whatever is on PATH:
the check asks that interpreter (its installed distribution and console script), not
`command -v redundancy-monitor`. pip is never really run here: a wrapper logs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def ensure_installed_source() -> str:
    text = (ROOT / "dev").read_text()
    match = re.search(r"^ensure_installed\(\) \{\n.*?^\}\n", text, re.S | re.M)
    assert match, "ensure_installed() not found in ./dev"
    return match.group(0)


def run_ensure_installed(tmp_path, hide_distribution: bool, fake_script_on_path: bool):
    """Run ./dev's ensure_installed with PY a wrapper around this interpreter that logs
    `-m pip` calls instead of running them; returns the logged pip calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pip.log"
    hide = tmp_path / "hide"
    hide.mkdir()
    # An interpreter where this project is not installed (its package still imports from
    # the checkout, as `python -c "import redundancy_monitor"` does in the repo root).
    (hide / "sitecustomize.py").write_text(
        "import importlib.metadata as md\n"
        "_real = md.distribution\n"
        "def distribution(name):\n"
        "    if name == 'redundancy-monitor':\n"
        "        raise md.PackageNotFoundError(name)\n"
        "    return _real(name)\n"
        "md.distribution = distribution\n"
    )
    pythonpath = f"{hide}:{ROOT}" if hide_distribution else str(ROOT)
    wrapper = bin_dir / "py"
    wrapper.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$*" >> {log}; exit 0; fi\n'
        f'PYTHONPATH={pythonpath} exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    if fake_script_on_path:  # another environment's console script
        fake = bin_dir / "redundancy-monitor"
        fake.write_text("#!/bin/sh\nexit 0\n")
        fake.chmod(0o755)
    script = f"PY={wrapper}\n{ensure_installed_source()}\nensure_installed\n"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_dev_installs_when_its_interpreter_lacks_the_project_though_path_has_the_script(
    tmp_path,
):
    calls = run_ensure_installed(tmp_path, hide_distribution=True, fake_script_on_path=True)
    assert any("install -q -e .[dev]" in c for c in calls), calls


def test_dev_does_not_reinstall_when_its_interpreter_has_the_project_though_path_lacks_it(
    tmp_path,
):
    calls = run_ensure_installed(tmp_path, hide_distribution=False, fake_script_on_path=False)
    assert calls == []
