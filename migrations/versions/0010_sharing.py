"""Sharing a cluster: each key's share of the bulk lane, its quotas, operator
keys; every finished request's engine time; usage per key, model and day

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('api_keys') as batch:
        batch.add_column(sa.Column('share', sa.Float(), server_default='1', nullable=False))
        batch.add_column(sa.Column('is_operator', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column('max_waiting_rows', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('max_waiting_tokens', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('requests_per_minute', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('token_budget', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('budget_period', sa.String(8), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('engine_seconds', sa.Float(), nullable=True))
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('engine_seconds', sa.Float(), server_default='0', nullable=False))
        batch.add_column(sa.Column('planned_tokens', sa.BigInteger(), server_default='0', nullable=False))
    op.create_table(
        'usage_daily',
        sa.Column('owner_id', sa.Integer(), sa.ForeignKey('api_keys.id', name='fk_usage_daily_owner_id_api_keys'),
                  primary_key=True),
        sa.Column('model', sa.String(200), primary_key=True),
        sa.Column('day', sa.Date(), primary_key=True),
        sa.Column('requests', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('prompt_tokens', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('completion_tokens', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('engine_seconds', sa.Float(), server_default='0', nullable=False),
    )
    op.create_index('ix_usage_daily_day', 'usage_daily', ['day'])


def downgrade():
    op.drop_index('ix_usage_daily_day', table_name='usage_daily')
    op.drop_table('usage_daily')
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('planned_tokens')
        batch.drop_column('engine_seconds')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('engine_seconds')
    with op.batch_alter_table('api_keys') as batch:
        for column in ('budget_period', 'token_budget', 'requests_per_minute', 'max_waiting_tokens',
                       'max_waiting_rows', 'is_operator', 'share'):
            batch.drop_column(column)
