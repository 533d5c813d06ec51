"""deidentified_study: the way back from a de-identified study to its original, kept in the
clinical partition

Revision ID: 0008
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deidentified_study",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("deidentified_study_uid", sa.String(length=64), nullable=False),
        sa.Column("date_shift_days", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["partition"], ["partition.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("partition", "project", "study_instance_uid"),
    )
    op.create_index(
        "ix_deidentified_pseudonym", "deidentified_study", ["partition", "project", "pseudonym"]
    )
    op.create_index(
        "ix_deidentified_new_study",
        "deidentified_study",
        ["partition", "project", "deidentified_study_uid"],
    )


def downgrade() -> None:
    op.drop_index("ix_deidentified_new_study", table_name="deidentified_study")
    op.drop_index("ix_deidentified_pseudonym", table_name="deidentified_study")
    op.drop_table("deidentified_study")
