"""the database as the queue of record: the jobs' and chunks' outbox, leader leases, kills

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

WAITING_ALONE = "status = 'queued' AND batch_id IS NULL AND kind != 'tribunal'"


def upgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_jobs_waiting', 'jobs', ['model', 'dispatched_at'], unique=False,
                    sqlite_where=sa.text(WAITING_ALONE), postgresql_where=sa.text(WAITING_ALONE))
    op.create_index('ix_batches_model_status', 'batches', ['model', 'status'], unique=False)
    op.create_table('batch_chunks',
    sa.Column('batch_id', sa.String(length=40), nullable=False),
    sa.Column('chunk', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], name='fk_batch_chunks_batch_id_batches', ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('batch_id', 'chunk')
    )
    op.create_index('ix_batch_chunks_state', 'batch_chunks', ['state', 'model', 'dispatched_at'], unique=False)
    op.create_table('leader_leases',
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('holder', sa.String(length=200), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    with op.batch_alter_table('worker_allocations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kill_requested_at', sa.DateTime(timezone=True), nullable=True))
    # Work that waits today was sent before this version kept an outbox: record
    # it as sent, so the dispatcher's comparison with the broker finds any of
    # it whose message is gone.
    op.execute("UPDATE jobs SET dispatched_at = created_at WHERE " + WAITING_ALONE)
    op.execute(
        "INSERT INTO batch_chunks (batch_id, chunk, model, state, dispatched_at) "
        "SELECT batch_id, chunk, model, "
        "CASE WHEN sum(CASE WHEN status = 'queued' THEN 1 ELSE 0 END) > 0 THEN 'sent' ELSE 'taken' END, "
        "min(created_at) FROM jobs "
        "WHERE batch_id IS NOT NULL AND chunk IS NOT NULL AND status IN ('queued', 'running') "
        "GROUP BY batch_id, chunk, model"
    )


def downgrade():
    with op.batch_alter_table('worker_allocations', schema=None) as batch_op:
        batch_op.drop_column('kill_requested_at')
    op.drop_table('leader_leases')
    op.drop_index('ix_batch_chunks_state', table_name='batch_chunks')
    op.drop_table('batch_chunks')
    op.drop_index('ix_batches_model_status', table_name='batches')
    op.drop_index('ix_jobs_waiting', table_name='jobs')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('retry_at')
        batch_op.drop_column('dispatched_at')
