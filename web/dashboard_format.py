"""How the dashboard writes times, durations, rates, progress bars and
sparklines: Jinja filters, all plain functions of their values.

Bars and charts are inline SVG drawn with attributes (no style attribute,
which the Content-Security-Policy forbids), so they render without
JavaScript and their numbers are in the HTML.
"""

import json
from datetime import datetime

from queue_engine.models import utcnow


def as_datetime(value):
    """A datetime from a datetime or the API's ISO text; None stays None."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def when(value):
    """``2026-12-02 12:00:03 UTC``; a dash for no time.

    >>> when("2026-12-02T12:00:03.5Z")
    '2026-12-02 12:00:03 UTC'
    """
    moment = as_datetime(value)
    return "—" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds):
    """Seconds in words a person reads at a glance.

    >>> [duration(s) for s in (None, 0.25, 42, 185, 7300)]
    ['—', '0.25 s', '42 s', '3 min 5 s', '2 h 1 min']
    """
    if seconds is None:
        return "—"
    if seconds < 10:
        return f"{seconds:.2f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def ago(value, now=None):
    """How long ago ``value`` was: ``3 min 5 s ago``."""
    moment = as_datetime(value)
    if moment is None:
        return "—"
    return duration(max(0.0, ((now or utcnow()) - moment).total_seconds())) + " ago"


def rate(value, unit):
    """``12.5 rows/s``; a dash for no rate.

    >>> rate(12.345, "rows/s"), rate(None, "rows/s"), rate(1234.5, "tok/s")
    ('12.3 rows/s', '—', '1,234 tok/s')
    """
    if value is None:
        return "—"
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"


def bar_segments(progress, width=100):
    """The filled parts of a progress bar ``width`` units wide, in order:
    ``[(css class, x, width)]`` for the completed, failed and cancelled rows.

    >>> from types import SimpleNamespace
    >>> bar_segments(SimpleNamespace(total=4, completed=2, failed=1, cancelled=0))
    [('completed', 0.0, 50.0), ('failed', 50.0, 25.0)]
    """
    segments, x = [], 0.0
    for name in ("completed", "failed", "cancelled"):
        count = getattr(progress, name)
        if count and progress.total:
            part = width * count / progress.total
            segments.append((name, round(x, 3), round(part, 3)))
            x += part
    return segments


def sparkline(values, width=240, height=40):
    """The ``points`` of an SVG polyline of ``values`` across ``width``,
    the largest at the top (all zero: along the bottom).

    >>> sparkline([0, 5, 10], width=100, height=20)
    '0.0,19.0 50.0,10.0 100.0,1.0'
    """
    top = max(values) or 1
    step = width / max(1, len(values) - 1)
    usable = height - 2  # a pixel above and below, so the line is not clipped
    return " ".join(f"{i * step:.1f},{height - 1 - usable * v / top:.1f}" for i, v in enumerate(values))


def pretty_json(value):
    """JSON text as a person reads it (escaped for HTML by the template).

    >>> pretty_json({"max_tokens": 16, "stop": ["é"]})
    '{"max_tokens": 16, "stop": ["é"]}'
    """
    return json.dumps(value, ensure_ascii=False)


FILTERS = {"when": when, "duration": duration, "ago": ago, "rate": rate, "bar_segments": bar_segments,
           "sparkline": sparkline, "pretty_json": pretty_json}


def init_app(app):
    app.jinja_env.filters.update(FILTERS)
    app.context_processor(lambda: {"now": utcnow()})
