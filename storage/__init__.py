"""Durable state: window aggregates, the join buffer and consumed offsets, in SQLite or PostgreSQL."""
