"""the findings of a done AI job, why no model applies to a study, and the reviews of AI
findings

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 08:00:00.000000

``inference_job.findings``: how many findings the job's SR reports as present (null until the
job is done, and for jobs done before this revision); ``ai_finding``: those findings, one row
each (what, where, how big, the SEG segment and SR). ``study.ai_note``: why no model applies
to the study, written when the stability scan queues nothing; ``study.ai_priority``: the highest
priority its jobs were queued with (STAT first in the worklist, from an index).
``finding_review``: one row per accept or reject decision on a finding, beside the DICOM SR
that records it in the study.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("inference_job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("findings", sa.Integer(), nullable=True))
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ai_note", sa.Text(), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column("ai_priority", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.create_index(
            "ix_study_worklist", ["partition", "ai_priority", "created_at", "id"], unique=False
        )
    # Studies queued before this revision: their jobs' highest priority.
    op.execute(
        "UPDATE study SET ai_priority = COALESCE((SELECT MAX(j.priority) FROM inference_job j"
        " WHERE j.partition = study.partition"
        " AND j.study_instance_uid = study.study_instance_uid), 0)"
    )

    op.create_table(
        "ai_finding",
        sa.Column("id", _ID, nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("job_id", _ID, nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("report_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("tracking_uid", sa.String(length=64), nullable=False),
        sa.Column("tracking_identifier", sa.String(length=64), nullable=False),
        sa.Column("finding", sa.String(length=64), nullable=False),
        sa.Column("finding_code", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=64), nullable=False),
        sa.Column("present", sa.Boolean(), nullable=False),
        sa.Column("size", sa.Float(), nullable=True),
        sa.Column("size_unit", sa.String(length=16), nullable=False),
        sa.Column("segment_number", sa.Integer(), nullable=True),
        sa.Column("segmentation_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["partition"], ["partition.name"]),
        sa.ForeignKeyConstraint(["job_id"], ["inference_job.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ai_finding", schema=None) as batch_op:
        batch_op.create_index("ix_ai_finding_job", ["job_id"], unique=False)
        batch_op.create_index(
            "ix_ai_finding_study", ["partition", "study_instance_uid"], unique=False
        )

    op.create_table(
        "finding_review",
        sa.Column("id", _ID, nullable=False),
        sa.Column("partition", sa.String(length=64), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("job_id", _ID, nullable=True),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("report_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("tracking_uid", sa.String(length=64), nullable=False),
        sa.Column("finding", sa.String(length=255), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reviewer", sa.String(length=324), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("review_sop_instance_uid", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["partition"], ["partition.name"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("finding_review", schema=None) as batch_op:
        batch_op.create_index(
            "ix_finding_review_study", ["partition", "study_instance_uid"], unique=False
        )
        batch_op.create_index("ix_finding_review_decided", ["partition", "decided_at"])


def downgrade() -> None:
    with op.batch_alter_table("finding_review", schema=None) as batch_op:
        batch_op.drop_index("ix_finding_review_decided")
        batch_op.drop_index("ix_finding_review_study")
    op.drop_table("finding_review")
    with op.batch_alter_table("ai_finding", schema=None) as batch_op:
        batch_op.drop_index("ix_ai_finding_study")
        batch_op.drop_index("ix_ai_finding_job")
    op.drop_table("ai_finding")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_index("ix_study_worklist")
        batch_op.drop_column("ai_priority")
        batch_op.drop_column("ai_note")
    with op.batch_alter_table("inference_job", schema=None) as batch_op:
        batch_op.drop_column("findings")
