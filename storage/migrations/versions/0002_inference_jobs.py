"""inference jobs and study stability

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 06:30:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("stable_last_instance_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            "ix_study_last_instance", ["partition", "last_instance_at"], unique=False
        )

    op.create_table(
        "inference_job",
        sa.Column("id", _ID, nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("job_key", sa.String(length=255), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("input_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("worker", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("outputs", _JSON, nullable=True),
        sa.ForeignKeyConstraint(["partition"], ["partition.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("partition", "series_instance_uid", "model_name"),
    )
    with op.batch_alter_table("inference_job", schema=None) as batch_op:
        batch_op.create_index("ix_inference_job_claim", ["state", "priority", "id"], unique=False)
        batch_op.create_index(
            "ix_inference_job_study", ["partition", "study_instance_uid"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("inference_job", schema=None) as batch_op:
        batch_op.drop_index("ix_inference_job_study")
        batch_op.drop_index("ix_inference_job_claim")
    op.drop_table("inference_job")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_last_instance")
        batch_op.drop_column("stable_last_instance_at")
