"""CORS origins in the index (managed at run time; seeded from [http] cors_allowed_origins).

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("cors_origin", sa.Column("origin", sa.String(255), primary_key=True))


def downgrade() -> None:
    op.drop_table("cors_origin")
