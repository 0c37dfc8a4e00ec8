"""OpenAI-compatible batches and chat: a batch's endpoint, input file, window
and expiry, metadata and token totals; output and error files that belong to
a batch (their content is read from its rows); a job's extra output (more
samples than one, log probabilities)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-16
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('metadata', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('endpoint', sa.String(length=40), nullable=True))
        batch.add_column(sa.Column('input_file_id', sa.String(length=40), nullable=True))
        batch.add_column(sa.Column('completion_window', sa.String(length=20), nullable=True))
        batch.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('cancelling_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('prompt_tokens', sa.BigInteger(), server_default='0', nullable=False))
        batch.add_column(sa.Column('completion_tokens', sa.BigInteger(), server_default='0', nullable=False))
    op.create_index('ix_batches_expires_at', 'batches', ['status', 'expires_at'], unique=False)
    with op.batch_alter_table('files') as batch:
        batch.add_column(sa.Column('batch_id', sa.String(length=40), nullable=True))
        batch.add_column(sa.Column('content', sa.String(length=10), server_default='disk', nullable=False))
        batch.create_foreign_key('fk_files_batch_id_batches', 'batches', ['batch_id'], ['id'], ondelete='CASCADE')
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('output', sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('output')
    with op.batch_alter_table('files') as batch:
        batch.drop_constraint('fk_files_batch_id_batches', type_='foreignkey')
        batch.drop_column('content')
        batch.drop_column('batch_id')
    op.drop_index('ix_batches_expires_at', table_name='batches')
    with op.batch_alter_table('batches') as batch:
        for column in ('completion_tokens', 'prompt_tokens', 'cancelling_at', 'expires_at', 'completion_window',
                       'input_file_id', 'endpoint', 'metadata'):
            batch.drop_column(column)
