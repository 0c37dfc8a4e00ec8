"""The database layer's promises, on SQLite and PostgreSQL."""

from sqlalchemy import func, select

from queue_engine.models import ApiKey


def test_a_savepoint_first_in_a_transaction_is_rolled_back_with_it(sessions):
    """SQLite's Python driver begins a transaction only before a write, so a
    savepoint opened first ran outside any, and releasing it committed: a
    request that failed after it kept what it stored (an idempotent job, a
    /v1 batch)."""
    with sessions() as session:
        with session.begin():
            with session.begin_nested():
                session.add(ApiKey(name="kept?", key_hash="h" * 64, key_prefix="qe_x", webhook_secret="s"))
            session.rollback()
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ApiKey)) == 0
