"""The dashboard: the newest single jobs and tribunals without walking past
batch rows (of a key by id, of all keys by time), and the jobs that finished
in the last minutes (tokens per second)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

TOP_LEVEL = "batch_id IS NULL AND parent_id IS NULL"


def upgrade():
    op.create_index('ix_jobs_top_level_owner', 'jobs', ['owner_id', 'id'], unique=False,
                    sqlite_where=sa.text(TOP_LEVEL), postgresql_where=sa.text(TOP_LEVEL))
    op.create_index('ix_jobs_top_level_created', 'jobs', ['created_at', 'id'], unique=False,
                    sqlite_where=sa.text(TOP_LEVEL), postgresql_where=sa.text(TOP_LEVEL))
    op.create_index('ix_jobs_finished_at', 'jobs', ['finished_at'], unique=False)


def downgrade():
    op.drop_index('ix_jobs_finished_at', table_name='jobs')
    op.drop_index('ix_jobs_top_level_created', table_name='jobs')
    op.drop_index('ix_jobs_top_level_owner', table_name='jobs')
