"""The frame table packed: instance.frame_table, a binary column (storage.frame_table).

Revision ID: 0013
Revises: 0012

New rows record where each frame lies as packed words (4 bytes per fragment, 8 past a 4 GiB
span; 32 bytes for native pixel data) instead of the JSON ``frame_ranges`` (about 30 bytes of
text per frame, parsed whole for every frame request). Existing rows keep their JSON
``frame_ranges``, which is still read: converting them here would rewrite every instance row
in one transaction.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instance", sa.Column("frame_table", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # Rows written since keep no JSON frame ranges: their frames are then read from the whole
    # file, as those of an instance without ranges.
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("frame_table")
