"""The package as users get it: the built wheel, installed into a fresh virtual
environment without the source tree on the path, runs its command line and a probe.

The venv sees the system's site-packages (torch, transformers: nothing is downloaded),
where the development checkout may be installed in editable mode too; the test proves
the venv's own copy is the one imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import redundancy_monitor
from redundancy_monitor._version import __version__

ROOT = Path(__file__).resolve().parent.parent
#: What the wheel is built from: the package and the files pyproject.toml names.
SOURCES = ("pyproject.toml", "README.md", "redundancy_monitor")

PROBE_SCRIPT = """
import json, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
import redundancy_monitor as rm

torch.manual_seed(0)
config = AutoConfig.for_model(
    "llama", vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=64, num_key_value_heads=2, head_dim=8,
)
model = AutoModelForCausalLM.from_config(config).eval()
ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
result = rm.probe(model, ids)
print(json.dumps({
    "file": rm.__file__,
    "submodule": __import__("redundancy_monitor.monitoring.webhook").monitoring.webhook.__file__,
    "version": rm.__version__,
    "scalars": result.summary.scalars(),
}))
"""


def tiny_probe_in_this_process() -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_key_value_heads=2,
        head_dim=8,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    return redundancy_monitor.probe(model, ids).summary.scalars()


def run(args, cwd: Path, **kw) -> subprocess.CompletedProcess:
    """A child without this checkout on its path: no PYTHONPATH, started elsewhere."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run(
        list(map(str, args)), cwd=cwd, env=env, capture_output=True, text=True, timeout=120, **kw
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv folder, wheel): the wheel built from a copy of the sources
    (the checkout is left clean) and installed into a new venv."""
    pytest.importorskip("build", reason="the wheel is built with `python -m build`")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, src / name)
    # No isolation: the build backend (setuptools) is taken from this environment
    # instead of being downloaded.
    built = run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp / "dist", src],
        tmp,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("redundancy_monitor-*.whl")
    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    added = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            wheel,
        ],
        tmp,
    )
    assert added.returncode == 0, added.stderr[-3000:]
    return python, venv, wheel


def test_the_wheel_ships_its_types_and_one_version(installed):
    _, _, wheel = installed
    assert wheel.name.startswith(f"redundancy_monitor-{__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(f"redundancy_monitor-{__version__}.dist-info/METADATA").decode()
        entry_points = z.read(f"redundancy_monitor-{__version__}.dist-info/entry_points.txt")
    assert "redundancy_monitor/py.typed" in names  # PEP 561: type checkers use our hints
    assert "redundancy_monitor/monitoring/webhook.py" in names
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/"))]
    assert f"\nVersion: {__version__}\n" in metadata
    assert b"redundancy-monitor = redundancy_monitor.tools.cli:main" in entry_points


def test_the_installed_command_line_and_probe_come_from_the_venv(installed, tmp_path):
    python, venv, _ = installed
    version = run([venv / "bin" / "redundancy-monitor", "--version"], tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"redundancy-monitor {__version__}"
    helped = run([python, "-m", "redundancy_monitor", "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("score", "replay", "watch", "report", "--version"):
        assert command in helped.stdout
    probed = run([python, "-c", PROBE_SCRIPT], tmp_path)
    assert probed.returncode == 0, probed.stderr[-3000:]
    out = json.loads(probed.stdout.strip().splitlines()[-1])
    # The venv's copy, not this checkout (nor an editable install elsewhere)
    site = (venv / "lib").resolve()
    for path in (out["file"], out["submodule"]):
        assert Path(path).resolve().is_relative_to(site), path
        assert not Path(path).resolve().is_relative_to(ROOT), path
    assert Path(redundancy_monitor.__file__).resolve() != Path(out["file"]).resolve()
    assert out["version"] == __version__
    # ...and it measures what the checkout measures on the same tiny model
    mine = tiny_probe_in_this_process()
    assert out["scalars"].keys() == mine.keys()
    for name, value in mine.items():
        assert out["scalars"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name


USER_CODE = """
from redundancy_monitor._version import __version__
from redundancy_monitor.monitoring.webhook import WebhookAlerts

hook = WebhookAlerts(123)
version: int = __version__
"""


def test_a_users_type_checker_reads_the_installed_hints(installed, tmp_path):
    """mypy, run on a user's file with the installed package, checks calls against our
    hints (py.typed); without the marker it would only say the package has no types."""
    pytest.importorskip("mypy")
    python, _, _ = installed
    (tmp_path / "use.py").write_text(USER_CODE)
    args = ["--follow-imports=silent", "--cache-dir", tmp_path / "cache", "use.py"]
    checked = run([python, "-m", "mypy", *args], tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert 'Argument 1 to "WebhookAlerts" has incompatible type "int"; expected "str"' in (
        checked.stdout
    )
    assert '(expression has type "str", variable has type "int")' in checked.stdout
    assert "py.typed" not in checked.stdout
