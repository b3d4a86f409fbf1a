"""The package version, in one place: ``pyproject.toml`` reads it (setuptools' dynamic
version), ``redundancy_monitor.__version__`` and ``redundancy-monitor --version`` show it."""

__version__ = "0.1.0"
