"""Where the benchmarks keep their figures: ``bench/results/<name>.json``.

Every benchmark ends with ``save(name, figures)``: it writes the final JSON
object there (for ``bench/report.py`` to plot) and prints it as the last
line, as the benchmarks always have. ``QE_BENCH_RESULTS`` points the files
elsewhere, for a trial run that should not replace the README's figures.
"""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(os.environ.get("QE_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def save(name, figures, directory=None):
    """Write ``figures`` to ``<directory>/<name>.json`` and print them as one JSON line.

    Args:
        name: the benchmark, e.g. ``"throughput"``; the file's name.
        figures: a JSON-ready dict; ``measured_at`` (UTC) is added to the file.
        directory: default ``RESULTS``.

    Returns:
        The path written.
    """
    directory = Path(directory or RESULTS)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    stamped = {**figures, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.write_text(json.dumps(stamped, indent=1) + "\n")
    print(f"figures saved to {path}")
    print(json.dumps(figures), flush=True)
    return path
