"""Pure metric kernels and mergeable window state. No I/O: no Kafka, HTTP or SQL here."""
