"""The transfer set and the training runner's jobs.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transfer_set",
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("request_id", sa.String(256), primary_key=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("student_version", sa.String(256), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
    )
    op.create_index("ix_transfer_set_model_ts", "transfer_set", ["model", "ts"])
    op.create_table(
        "retrain_jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("started_at", sa.BigInteger, nullable=True),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
        sa.Column("parent_version", sa.String(256), nullable=True),
        sa.Column("student_version", sa.String(256), nullable=True),
        sa.Column("metrics", sa.Text, nullable=True),
        sa.Column("log", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_retrain_jobs_model_status", "retrain_jobs", ["model", "status"])


def downgrade() -> None:
    op.drop_index("ix_retrain_jobs_model_status", "retrain_jobs")
    op.drop_table("retrain_jobs")
    op.drop_index("ix_transfer_set_model_ts", "transfer_set")
    op.drop_table("transfer_set")
