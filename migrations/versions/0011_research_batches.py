"""Research batches: prompt templates over columns, structured answers as
result columns, the input's own columns carried into the results

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('batches') as batch:
        batch.add_column(sa.Column('options', sa.JSON(), nullable=True))
        batch.add_column(sa.Column('columns', sa.JSON(), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('cells', sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('cells')
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('columns')
        batch.drop_column('options')
