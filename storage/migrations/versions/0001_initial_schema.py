"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23 06:04:07.712307
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "partition",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Only the default partition exists for now; every row carries its partition already.
    op.bulk_insert(sa.table("partition", sa.column("name", sa.String)), [{"name": "default"}])
    op.create_table(
        "patient",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=False),
        sa.Column("patient_name", sa.String(length=324), nullable=False),
        sa.Column("patient_name_upper", sa.String(length=324), nullable=False),
        sa.Column("patient_birth_date", sa.String(length=8), nullable=False),
        sa.Column("patient_sex", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["partition"],
            ["partition.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("partition", "patient_id", "issuer_of_patient_id"),
    )
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.create_index("ix_patient_name", ["partition", "patient_name_upper"], unique=False)

    op.create_table(
        "study",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column(
            "patient_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_date", sa.String(length=8), nullable=False),
        sa.Column("study_time", sa.String(length=16), nullable=False),
        sa.Column("accession_number", sa.String(length=16), nullable=False),
        sa.Column("study_id", sa.String(length=16), nullable=False),
        sa.Column("study_description", sa.String(length=64), nullable=False),
        sa.Column("referring_physician_name", sa.String(length=324), nullable=False),
        sa.Column("modalities_in_study", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_instance_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["partition"],
            ["partition.name"],
        ),
        sa.ForeignKeyConstraint(
            ["patient_pk"],
            ["patient.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("partition", "study_instance_uid"),
    )
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.create_index("ix_study_accession", ["partition", "accession_number"], unique=False)
        batch_op.create_index("ix_study_date", ["partition", "study_date"], unique=False)
        batch_op.create_index("ix_study_patient", ["patient_pk"], unique=False)

    op.create_table(
        "series",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("study_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=False),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("series_description", sa.String(length=64), nullable=False),
        sa.Column("body_part_examined", sa.String(length=16), nullable=False),
        sa.Column("series_date", sa.String(length=8), nullable=False),
        sa.Column("series_time", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["partition"],
            ["partition.name"],
        ),
        sa.ForeignKeyConstraint(
            ["study_pk"],
            ["study.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("partition", "series_instance_uid"),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index("ix_series_modality", ["partition", "modality"], unique=False)
        batch_op.create_index("ix_series_study", ["study_pk"], unique=False)

    op.create_table(
        "instance",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column(
            "series_pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("blob_key", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("calling_ae_title", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "metadata_json",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "frame_ranges",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["partition"],
            ["partition.name"],
        ),
        sa.ForeignKeyConstraint(
            ["series_pk"],
            ["series.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("partition", "sop_instance_uid"),
    )
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.create_index("ix_instance_series", ["series_pk"], unique=False)
        batch_op.create_index("ix_instance_sop_class", ["partition", "sop_class_uid"], unique=False)
        batch_op.create_index("ix_instance_blob_key", ["blob_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_index("ix_instance_sop_class")
        batch_op.drop_index("ix_instance_blob_key")
        batch_op.drop_index("ix_instance_series")

    op.drop_table("instance")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index("ix_series_study")
        batch_op.drop_index("ix_series_modality")

    op.drop_table("series")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_patient")
        batch_op.drop_index("ix_study_date")
        batch_op.drop_index("ix_study_accession")

    op.drop_table("study")
    with op.batch_alter_table("patient", schema=None) as batch_op:
        batch_op.drop_index("ix_patient_name")

    op.drop_table("patient")
    op.drop_table("partition")
