"""The web imports nothing of ``workers``: it sends by queue and task name."""

import subprocess
import sys


def test_web_import_loads_no_workers_module():
    """Importing ``web`` (and building its app factory) loads no ``workers`` module."""
    code = ("import sys, web, web.server\n"
            "loaded = sorted(m for m in sys.modules if m == 'workers' or m.startswith('workers.'))\n"
            "print(','.join(loaded))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
