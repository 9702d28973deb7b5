"""JSONL files as the columnar engine's batches: parsed by Arrow's JSON reader, or line by line where it must.

A batch of lines is parsed at once by ``pyarrow.json`` with the contract's column types given, so
that a value of another JSON type (a string ``ts``, a float ``label``, a number as ``request_id``,
``NaN``), a field named twice, a line that is not an object or an unknown field fails the parse:
then that batch is read line by line with the contract's decoder (collector.contract), each line
rejected with the decoder's reason or turned into the row it stands for (as `kdwatch convert`
writes it). So does a batch where a row may mean something else to the two (an explicit ``null`` where
the decoder tells it from an absent field, ``NaN`` or ``Infinity``, which Arrow reads as numbers) or
a line over the size limit: the fast way only ever keeps values whose meaning the two agree on. Either way the rows are then validated
on columns (collector.column_rules) and carry their merge keys and row numbers, so the engine sees
the same rows, reasons and hints as the decoder gives record by record.

Generative events are always read line by line (their generations are checked by the contract's own
rule); a feature holding numbers in some lines and strings in others keeps each value as sent.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pj

from kdwatch.analyzer.drift import Reference
from kdwatch.collector.column_rules import Batch, Hint, validate
from kdwatch.collector.columns import BATCH_ROWS, FIELDS, Block, null_mask, objects, to_numpy
from kdwatch.collector.contract import DECODERS, MAX_FEATURES, MAX_STRING_CHARS, MAX_VALUE_BYTES, parse_ts
from kdwatch.collector.ingest import merge_key, window_hint_fields
from kdwatch.collector.parquet_io import columns_for, reference_from_batches
from kdwatch.errors import ContractError

BATCH_BYTES = 32 << 20  # a batch of lines holds at most about this much text


def line_chunks(path: Path, rows: int | None = None) -> Iterator[list[bytes]]:
    """The file's non-blank lines (line ends stripped), ``rows`` at a time (in order)."""
    with path.open("rb") as handle:
        yield from chunked(handle, rows)


def chunked(values: Iterable[bytes], rows: int | None = None) -> Iterator[list[bytes]]:
    """The non-blank ones of ``values``, line ends stripped, in lists of ``rows`` (default BATCH_ROWS) lines or
    BATCH_BYTES bytes, whichever comes first (a generative student's lines are kilobytes each)."""
    size = rows or BATCH_ROWS
    chunk: list[bytes] = []
    held = 0
    for value in values:
        line = value.rstrip(b"\r\n")
        if not line.strip():
            continue
        chunk.append(line)
        held += len(line)
        if len(chunk) == size or held >= BATCH_BYTES:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk


def _schema(kind: str) -> pa.Schema:
    """The contract's columns with their types, ``features`` left for the reader to infer."""
    schema = columns_for(kind, {}, False)
    return schema.append(pa.field("v", pa.int64()))


_SCHEMAS = {kind: _schema(kind) for kind in FIELDS}
_TEXT_TS_SCHEMAS = {kind: schema.set(schema.get_field_index("ts"), pa.field("ts", pa.string())) for kind, schema in _SCHEMAS.items()}
# Fields where the decoder tells an explicit null from an absent field (Arrow cannot): v (null is an
# unsupported version), probs and logits (present, of the wrong type).
_NULL_MATTERS = ("v", "probs", "logits")


def _finite(values: pa.Array) -> bool:
    """No NaN or infinity among the numbers (Arrow's reader takes NaN / Infinity, the decoder calls them invalid JSON)."""
    if values.null_count:
        return False  # a null inside a list, or as a feature's value where the row has the feature: the decoder decides
    if not pa.types.is_floating(values.type):
        return True
    return bool(np.isfinite(to_numpy(values)).all())


def _read_otherwise(batch: pa.RecordBatch, lines: list[bytes], blob: bytes) -> bool:
    """Whether some row may mean something else to the contract's decoder than to Arrow's reader.

    Conservative: a null that may be explicit where it matters (the line names the field), a
    number that is not finite, a feature null in a row that holds ``null`` anywhere.
    """
    names = batch.schema.names
    for name in _NULL_MATTERS:
        if name in names and batch.column(name).null_count:
            token = f'"{name}"'.encode()
            if token in blob and any(token in lines[i] for i in np.flatnonzero(null_mask(batch.column(name)))):
                return True
    for name in ("probs", "logits"):
        if name in names and not _finite(batch.column(name).flatten()):
            return True
    if "latency_ms" in names and not _finite(batch.column("latency_ms").drop_null()):
        return True
    if "features" in names:
        features = batch.column("features")
        present = ~null_mask(features)
        for child in features.flatten():  # each feature, null where the row lacks the struct or the feature
            missing = null_mask(child) & present
            if missing.any() and b"null" in blob and any(b"null" in lines[i] for i in np.flatnonzero(missing)):
                return True
            if not _finite(child.drop_null()):
                return True
    return False
_FEATURE_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_string, pa.types.is_null)


def _parse(blob: bytes, schema: pa.Schema) -> pa.Table | None:
    try:
        # Blocks of 4 MiB parsed on Arrow's threads (2.2x faster than one block on 2 cores).
        return pj.read_json(io.BytesIO(blob), read_options=pj.ReadOptions(block_size=4 << 20, use_threads=True),
                            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None


def _ts_to_ms(table: pa.Table) -> pa.Table | None:
    """``ts`` read as text turned into epoch milliseconds by the decoder's own parser (None: a value it refuses)."""
    at = table.schema.get_field_index("ts")
    try:
        ms = [None if v is None else parse_ts(v) for v in table.column(at).to_pylist()]
    except ContractError:
        return None
    return table.set_column(at, "ts", pa.array(ms, type=pa.int64()))


def fast_batch(lines: list[bytes], kind: str) -> pa.RecordBatch | None:
    """The lines as one record batch parsed by Arrow, or None where the line-by-line way must decide."""
    blob = b"\n".join(lines)
    if max(map(len, lines)) > MAX_VALUE_BYTES or b'"generation"' in blob:
        return None  # a line over the limit, or a generative student's events: decoded line by line
    if not blob.isascii():
        try:
            blob.decode("utf-8")  # Arrow's reader takes invalid UTF-8 inside strings; the decoder calls it invalid JSON
        except UnicodeDecodeError:
            return None
    table = _parse(blob, _SCHEMAS[kind])
    if table is None:  # event times as RFC 3339 text, as the contract allows, or something the decoder must see
        table = _parse(blob, _TEXT_TS_SCHEMAS[kind])
        if table is not None:
            table = _ts_to_ms(table)
    if table is None or table.num_rows != len(lines):
        return None
    names = set(table.schema.names)
    if not names <= FIELDS[kind] or "prompt_tokens" in names or "generation" in names:
        return None  # an unknown field (the decoder names it), or a generative event (decoded line by line)
    if "features" in names:
        t = table.schema.field("features").type
        if not pa.types.is_struct(t) or t.num_fields > MAX_FEATURES:
            return None
        for sub in t:
            if not 0 < len(sub.name) <= MAX_STRING_CHARS or sub.name[0] == "_" or not any(ok(sub.type) for ok in _FEATURE_TYPES):
                return None
    batches = table.combine_chunks().to_batches()
    if not batches or _read_otherwise(batches[0], lines, blob):
        return None
    return batches[0]


def _parsed(line: bytes) -> Any:
    """The JSON of a line merge_key left unparsed (over the size limit), for its window hint only."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None


def by_line(lines: list[bytes], kind: str, row0: int, key0: int) -> tuple[Block | None, dict[str, int], list[Hint], int]:
    """The lines decoded one at a time: rejected ones counted (and hinted), valid ones as rows (as `kdwatch convert` writes them)."""
    decode = DECODERS[kind]
    reasons: Counter[str] = Counter()
    hints: list[Hint] = []
    rows: list[dict[str, Any]] = []
    rownos: list[int] = []
    mkeys: list[int] = []
    feature_types: dict[str, str] = {}
    mixed: set[str] = set()  # features holding numbers in some lines and strings in others
    prompts: list[Any] = []
    generations: dict[int, Any] = {}  # row -> its Generation
    mkey = key0
    for i, line in enumerate(lines):
        key, obj = merge_key(line)
        mkey = max(mkey, key)
        try:
            event = decode(obj if obj is not None else line)
        except ContractError as exc:
            reasons[exc.reason] += 1
            if kind == "prediction":
                fields = window_hint_fields(obj if obj is not None else _parsed(line))
                if fields is not None:
                    hints.append((*fields, mkey, row0 + i))
            continue
        assert obj is not None
        row = dict(obj)
        row["ts"] = parse_ts(row["ts"])
        row.pop("v", None)
        prompts.append(row.pop("prompt_tokens", None))
        if row.pop("generation", None) is not None:  # kept as the decoder made it, not as an Arrow column
            generations[len(rows)] = getattr(event, "generation", None)
        features = row.get("features")
        if features is not None:
            for name, value in features.items():
                t = "str" if isinstance(value, str) else "num"
                if feature_types.setdefault(name, t) != t:
                    mixed.add(name)
        rows.append(row)
        rownos.append(row0 + i)
        mkeys.append(mkey)
    if not rows:
        return None, dict(reasons), hints, mkey
    sent_features = [row.get("features") for row in rows]
    for row in rows:
        features = row.get("features")
        if features is not None:  # numbers as floats; a feature of both kinds as text here, put back below
            row["features"] = {k: (str(v) if k in mixed else v if feature_types[k] == "str" else float(v))
                               for k, v in features.items()}
    types = {name: "str" if name in mixed else t for name, t in sorted(feature_types.items())}
    schema = columns_for(kind, types, False)
    batch = pa.Table.from_pylist(rows, schema=schema).combine_chunks().to_batches()[0]
    gen = objects([generations.get(i) for i in range(len(rows))]) if generations else None
    block, more, _hints, _end = validate(batch, kind, generations=gen)
    reasons.update(more)  # none: the decoder accepted every one of these rows
    if block is not None:
        assert block.rowno is not None
        local = block.rowno
        block.rowno = np.asarray(rownos, dtype=np.int64)[local]
        block.mkey = np.asarray(mkeys, dtype=np.int64)[local]
        if kind == "prediction" and any(p is not None for p in prompts):
            block.prompt = objects(prompts)[local]
        for name in mixed:  # the values as sent (a number binned as a number, a string as a category)
            sent = [None if f is None or f.get(name) is None else f[name] if isinstance(f[name], str) else float(f[name])
                    for f in (sent_features[i] for i in local.tolist())]
            block.features[name] = objects(sent)
    return block, dict(reasons), hints, mkey


def read_jsonl_blocks(path: Path, kind: str) -> Iterator[Batch]:
    """Validated batches of a JSONL file of ``kind`` events, as collector.column_rules.read_blocks gives Parquet's."""
    return jsonl_batches(line_chunks(path), kind)


def jsonl_batches(chunks: Iterator[list[bytes]], kind: str) -> Iterator[Batch]:
    """Validated batches of ``kind`` events given as chunks of non-blank JSON lines in their input's order."""
    row0, key = 0, -1
    chunk = next(chunks, None)
    while chunk is not None:
        following = next(chunks, None)
        batch = fast_batch(chunk, kind)
        if batch is not None:
            block, reasons, hints, key = validate(batch, kind, row0=row0, key0=key)
        else:
            block, reasons, hints, key = by_line(chunk, kind, row0, key)
        row0 += len(chunk)
        yield Batch(block, reasons, hints, key, row0 - 1, following is None)
        chunk = following


class _NeedsDecoder(Exception):
    """A reference line the fast way cannot vouch for: the contract's decoder reads the file."""


def load_reference_jsonl(path: Path) -> dict[str, Reference] | None:
    """Per-model references from a JSONL file through Arrow; None when a line needs the contract's decoder.

    The decoder's builder (collector.offline.build_references) then reads the file, so an
    invalid line fails with its line number and message as before.
    """

    def batches() -> Iterator[pa.RecordBatch]:
        for chunk in line_chunks(path):
            batch = fast_batch(chunk, "prediction")
            if batch is None:
                raise _NeedsDecoder
            yield batch

    try:
        # A valid prediction takes at least 40 bytes: the file's size bounds its row count.
        return reference_from_batches(batches(), path.stat().st_size // 40 + 1, lambda _row, _reason: _NeedsDecoder())
    except _NeedsDecoder:
        return None
