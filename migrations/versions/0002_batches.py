"""batches

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('batches',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('input_format', sa.String(length=10), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=True),
    sa.Column('id_column', sa.String(length=200), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('completed', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('cancelled', sa.Integer(), nullable=False),
    sa.Column('chunks', sa.Integer(), nullable=False),
    sa.Column('errors', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['owner_id'], ['api_keys.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.create_index('ix_batches_owner_id_id', ['owner_id', 'id'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('batch_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('row_index', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('custom_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('chunk', sa.Integer(), nullable=True))
        batch_op.create_index('ix_jobs_batch_chunk', ['batch_id', 'chunk'], unique=False)
        batch_op.create_index('ix_jobs_batch_row', ['batch_id', 'row_index'], unique=True)
        batch_op.create_foreign_key('fk_jobs_batch_id_batches', 'batches', ['batch_id'], ['id'], ondelete='CASCADE')



def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_batch_id_batches', type_='foreignkey')
        batch_op.drop_index('ix_jobs_batch_row')
        batch_op.drop_index('ix_jobs_batch_chunk')
        batch_op.drop_column('chunk')
        batch_op.drop_column('custom_id')
        batch_op.drop_column('row_index')
        batch_op.drop_column('batch_id')

    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_index('ix_batches_owner_id_id')

    op.drop_table('batches')
