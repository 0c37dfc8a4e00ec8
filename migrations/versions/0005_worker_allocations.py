"""worker allocations and scaling states: what the autoscaler submitted to SLURM and why

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('scaling_states',
    sa.Column('deployment', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_failure', sa.Text(), nullable=True),
    sa.Column('idle_since', sa.DateTime(timezone=True), nullable=True),
    sa.Column('backlog', sa.Integer(), nullable=False),
    sa.Column('desired', sa.Integer(), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('deployment', 'model')
    )
    op.create_table('worker_allocations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('deployment', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=64), nullable=False),
    sa.Column('slurm_job_id', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('slurm_state', sa.String(length=40), nullable=True),
    sa.Column('node', sa.String(length=255), nullable=True),
    sa.Column('adopted', sa.Boolean(), nullable=False),
    sa.Column('submitted_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('serving_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('stop_requested_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('exit_reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('deployment', 'slurm_job_id', name='uq_worker_allocations_job')
    )
    with op.batch_alter_table('worker_allocations', schema=None) as batch_op:
        batch_op.create_index('ix_worker_allocations_active', ['deployment', 'model', 'ended_at'], unique=False)



def downgrade():
    with op.batch_alter_table('worker_allocations', schema=None) as batch_op:
        batch_op.drop_index('ix_worker_allocations_active')

    op.drop_table('worker_allocations')
    op.drop_table('scaling_states')
