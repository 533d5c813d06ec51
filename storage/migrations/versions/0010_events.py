"""the change feed: events written with the state change they report (transactional outbox),
the subscribers Hilum delivers them to (webhooks, FHIR push, routing) and their dead letters;
the Modality Performed Procedure Steps modalities report (a series complete sooner)

Revision ID: 0010
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "event",
        sa.Column("id", _ID, nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("payload", _JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        # Never reuse an id, even once every event has been pruned: readers' cursors are ids.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_event_partition", "event", ["partition", "id"])
    op.create_index("ix_event_created", "event", ["created_at"])
    op.create_table(
        "event_subscriber",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=False),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("delivered", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "event_dead_letter",
        sa.Column("id", _ID, nullable=False),
        sa.Column("subscriber", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_event_dead_letter_subscriber", "event_dead_letter", ["subscriber", "state", "id"]
    )
    op.create_table(
        "performed_procedure_step",
        sa.Column("id", _ID, nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("series", _JSON, nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["partition"], ["partition.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("partition", "sop_instance_uid"),
    )
    op.create_index(
        "ix_performed_procedure_step_status",
        "performed_procedure_step",
        ["partition", "status", "updated_at"],
    )


def downgrade() -> None:
    op.drop_table("performed_procedure_step")
    op.drop_table("event_dead_letter")
    op.drop_table("event_subscriber")
    op.drop_table("event")
