"""PostgreSQL: an index that serves PatientName prefix wild cards (``DOE*``)

Revision ID: 0003
Revises: 0002

PostgreSQL uses a B-tree index for ``LIKE 'DOE%'`` only under the C collation or with the
``varchar_pattern_ops`` operator class; databases are usually created with another collation.
SQLite's GLOB (used for case-sensitive wild cards) is served by the existing index.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_patient_name_pattern",
            "patient",
            ["partition", "patient_name_upper"],
            postgresql_ops={"patient_name_upper": "varchar_pattern_ops"},
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_patient_name_pattern", table_name="patient")
