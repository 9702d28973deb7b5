"""Kafka in: contract validation, the request_id join, event-time windows, exactly-once effect."""
