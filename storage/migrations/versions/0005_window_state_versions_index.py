"""A covering index for the windows endpoint's change checks.

`SqlStore.change_signature` (count, newest and sum of `updated_at` per model) and
`SqlStore.bucket_versions` read only key columns and `updated_at`; without this index SQLite walks
each row's overflow pages (the JSON state sits before `updated_at`), 62 ms per check over a month
of 1-minute windows, which stalled the API once a second.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_window_state_versions", "window_state", ["model", "student_version", "window_start", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_window_state_versions", table_name="window_state")
