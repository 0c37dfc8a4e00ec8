"""Database engine, sessions and schema upgrades.

SQLite (the embedded default) and PostgreSQL (production) both work; SQLite
gets WAL and a busy timeout so a few hundred worker threads can write to it.
"""

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.orm import sessionmaker

log = logging.getLogger(__name__)

#: The longest wait between two tries of a transaction while the database is away.
MAX_BACKOFF = 1.0

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url):
    """A SQLAlchemy engine for ``url``, tuned for many short transactions."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20, max_overflow=40)
        event.listen(engine, "connect", _tune_sqlite)
        event.listen(engine, "savepoint", _begin_before_savepoint)
        return engine
    return create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)


def _tune_sqlite(dbapi_connection, connection_record):
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_before_savepoint(connection, name):
    """Python's sqlite3 begins a transaction only before a write, so a
    SAVEPOINT that comes first runs outside any, and its RELEASE commits
    what the outer transaction may yet roll back. Begin it first."""
    driver_connection = connection.connection.dbapi_connection
    if not driver_connection.in_transaction:
        driver_connection.execute("BEGIN")


def make_session_factory(engine):
    return sessionmaker(engine, expire_on_commit=False)


def make_sessions(url):
    """A session factory on a new engine for ``url`` (for processes outside the web app)."""
    return make_session_factory(make_engine(url))


@contextmanager
def transaction(session_factory):
    """A session that commits on success and rolls back on error."""
    with session_factory() as session, session.begin():
        yield session


def is_unreachable(error):
    """Whether ``error`` says the database could not be reached (down,
    restarting, a dropped connection, SQLite busy), so the same work may
    succeed if tried again, as opposed to a mistake in the work itself."""
    return isinstance(error, (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError)) or (
        isinstance(error, exc.DBAPIError) and error.connection_invalidated)


def run_transaction(session_factory, work, retry_for=0.0):
    """Run ``work(session)`` in a transaction and return what it returns.

    While the database is unreachable (:func:`is_unreachable`), the whole
    transaction is tried again with back-off, for up to ``retry_for``
    seconds; then the last error is raised. ``work`` must be safe to run
    again: if a COMMIT was lost with its connection, the conditional
    UPDATEs of the job life cycle find the work already done.
    """
    deadline = time.monotonic() + retry_for
    delay, failures = 0.05, 0
    while True:
        try:
            with transaction(session_factory) as session:
                result = work(session)
        except Exception as e:
            if not is_unreachable(e) or time.monotonic() + delay > deadline:
                raise
            failures += 1
            if failures == 1:
                log.warning("the database is unreachable (%s); trying again for up to %g s",
                            type(e.orig if isinstance(e, exc.DBAPIError) else e).__name__, retry_for)
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
            continue
        if failures:
            log.warning("the database is reachable again (after %d tries)", failures + 1)
        return result


def try_transaction(session_factory, work):
    """``work(session)`` in a transaction, or None if the database is
    unreachable: for a write that may be skipped (a lease renewal; the next
    one, or the outcome, is written once the database is back)."""
    try:
        with transaction(session_factory) as session:
            return work(session)
    except Exception as e:
        if not is_unreachable(e):
            raise
        log.warning("skipped a write: the database is unreachable (%s)", type(e).__name__)
        return None


def alembic_config(url):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url, revision="head"):
    """Apply every migration up to ``revision`` to the database at ``url``."""
    from alembic import command

    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def ping(engine):
    """Raise unless the database answers a trivial query."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
