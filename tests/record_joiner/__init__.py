"""The record joiner: kdwatch's per-record engine until the columnar engine took every case (issue 16).

Kept here, outside the product, as a second reference implementation for the tests: it joins one
record at a time with the rules the README states, so the columnar engine (collector.columnar,
collector.live_columns) is checked against it on random streams, besides the independent model of
tests/oracle.py (which covers fewer fields).
"""
