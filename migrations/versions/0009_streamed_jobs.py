"""Streamed jobs: a job whose worker publishes its text as it is generated
(``stream: true`` on /v1/chat/completions and /v1/completions)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('stream', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade():
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('stream')
