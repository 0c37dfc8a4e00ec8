"""State tables: the one rule every kind of state follows.

Jobs, batches, chunks, worker allocations and webhook events each have a
state enum and an ``ALLOWED`` table (which state may follow which). Nothing
writes a state directly: every change is checked against its table, and made
by a conditional UPDATE (``... WHERE state IN (<sources>)``), so of two
processes racing to move the same row, exactly one does, and the other
learns it from the row count.
"""

from sqlalchemy import update

from .errors import InvalidTransitionError


def check_move(allowed, source, target, what):
    """``(source, target)`` as states of ``allowed``'s enum, if the table allows the move.

    Args:
        what: the kind of row in words, for the error (e.g. ``"batch"``).

    Raises:
        InvalidTransitionError: the table does not allow it.
    """
    states = type(next(iter(allowed)))
    source, target = states(source), states(target)
    if target not in allowed[source]:
        raise InvalidTransitionError(f"a {what} cannot go from {source.value!r} to {target.value!r}")
    return source, target


def move_statement(column, allowed, sources, target, where, values, what):
    """The conditional UPDATE that moves every row matching ``where`` whose
    state ``column`` is one of ``sources`` to ``target``, writing ``values``
    with it.

    Raises:
        InvalidTransitionError: the table does not allow a source -> target.
    """
    moves = [check_move(allowed, source, target, what) for source in sources]
    return (
        update(column.class_)
        .where(column.in_([source.value for source, _ in moves]), *where)
        .values({column.key: moves[0][1].value if moves else target, **values})
        .execution_options(synchronize_session=False)
    )
