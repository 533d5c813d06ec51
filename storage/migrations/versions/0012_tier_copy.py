"""storage tiers: the old tier of a moved blob, until its copy there is deleted

Revision ID: 0012
Revises: 0009 (the head: 0009 follows 0011)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tier_copy", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("tier_copy")
