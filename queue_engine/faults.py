"""Fault points: named places where a process may be told to die, so tests
and ``bench/chaos.py`` can prove what survives a crash at the worst moment.

Off unless the ``faults`` setting names a point (``QUEUE_ENGINE_FAULTS``);
never set it in production.
"""

import logging
import os

log = logging.getLogger(__name__)

#: After work was committed and before its messages were sent (web and workers).
AFTER_COMMIT = "after_commit"
#: The exit status of a process that died at a fault point.
EXIT_STATUS = 86


def crash_point(settings, point):
    """Die at once, as a SIGKILL would, if ``settings.faults`` names ``point``."""
    if point in settings.faults:
        log.critical("fault point %r: exiting now (faults setting)", point)
        logging.shutdown()
        os._exit(EXIT_STATUS)
