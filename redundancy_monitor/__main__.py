"""``python -m redundancy_monitor``: the command line."""

from redundancy_monitor.tools.cli import main

raise SystemExit(main())
