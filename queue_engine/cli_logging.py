"""Where the command line's log lines go.

Every command logs to stderr at ``--log-level``. Two commands hold the
libraries' chatter back unless ``-v``:

- ``demo``, a newcomer's first run, shows only its own lines (setup, the
  answers, the summary). Log lines (Celery's two per task, vLLM's engine
  report, alembic's one per migration) go to ``<data_dir>/logs/queue-engine.log``,
  and so does what native code and progress bars write to stderr.
- ``serve`` keeps logging to stderr, as a server should, with Celery, kombu
  and alembic at WARNING: per-task lines drown the service's own.
"""

import logging
import os
import sys
from contextlib import contextmanager

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Libraries that log at INFO per task, per connection or per migration.
CHATTY = ("celery", "kombu", "amqp", "alembic")


def log_to_stderr(level):
    """Every command's start: log lines at ``level`` and above to stderr."""
    logging.basicConfig(level=level, format=FORMAT)


def quiet_chatty_libraries():
    """Keep the CHATTY libraries' log lines to WARNING and above."""
    for name in CHATTY:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))


def log_to_file(path, level, verbose):
    """Send log lines at ``level`` and above to the file ``path``; to stderr as
    well with ``verbose``, else only errors there.

    vLLM's log lines come here too (it prints its own to stdout otherwise),
    so call this before vLLM is imported.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    # A stream of its own on the terminal's stderr: `stderr_to` may point
    # file descriptor 2 at the file while errors should still be seen.
    terminal = logging.StreamHandler(sys.stderr if verbose else os.fdopen(os.dup(2), "w"))
    terminal.setLevel(level if verbose else logging.ERROR)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in (logging.FileHandler(path), terminal):
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(level)


@contextmanager
def stderr_to(path, enabled=True):
    """While the block runs, send what this process writes to its stderr (file
    descriptor 2) to ``path``: torch's and vLLM's native warnings and the
    progress bars of loading a model print there, below Python's logging.

    Python's own errors still reach the terminal: an exception leaves the block first.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log_file:
        os.dup2(log_file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
