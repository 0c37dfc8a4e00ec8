"""tribunals: steps are jobs with a parent; the tribunal's trace is kept on the parent

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('step', sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column('tribunal', sa.JSON(), nullable=True))
        batch_op.create_index('ix_jobs_parent_id', ['parent_id'], unique=False)
        batch_op.create_foreign_key('fk_jobs_parent_id_jobs', 'jobs', ['parent_id'], ['id'], ondelete='CASCADE')


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_parent_id_jobs', type_='foreignkey')
        batch_op.drop_index('ix_jobs_parent_id')
        batch_op.drop_column('tribunal')
        batch_op.drop_column('step')
        batch_op.drop_column('parent_id')
