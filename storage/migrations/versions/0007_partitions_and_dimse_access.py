"""partitions' AE titles, DIMSE AE permissions, C-MOVE destinations, settings seeded once

Revision ID: 0007
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "partition_ae_title",
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["partition"], ["partition.name"]),
        sa.PrimaryKeyConstraint("ae_title"),
    )
    op.create_index(
        "ix_partition_ae_title_partition", "partition_ae_title", ["partition"], unique=False
    )
    op.create_table(
        "ae_permission",
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("store", sa.Boolean(), nullable=False),
        sa.Column("query", sa.Boolean(), nullable=False),
        sa.Column("retrieve", sa.Boolean(), nullable=False),
        sa.Column("networks", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.ForeignKeyConstraint(["partition"], ["partition.name"]),
        sa.PrimaryKeyConstraint("calling_ae_title", "partition"),
    )
    op.create_table(
        "move_destination",
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("tls", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("ae_title"),
    )
    op.create_table(
        "settings_seed",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("settings_seed")
    op.drop_table("move_destination")
    op.drop_table("ae_permission")
    op.drop_index("ix_partition_ae_title_partition", table_name="partition_ae_title")
    op.drop_table("partition_ae_title")
