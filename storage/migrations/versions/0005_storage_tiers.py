"""storage tiers: which tier holds each instance's blob, when a study was last read from one

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tier", sa.String(length=32), nullable=False, server_default="")
        )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_read_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_column("last_read_at")
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("tier")
