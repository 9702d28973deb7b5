"""Evidently's DataDriftPreset(method="psi") over the same 10 features (run in .venv-bench).

Prints {"load_s", "run_s"} as JSON: loading the files (JSONL or Parquet) into DataFrames and the report itself.
"""

from __future__ import annotations

import json
import sys
import time

import orjson
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset


def features(path: str) -> pd.DataFrame:
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = pq.read_table(path, columns=["features"]).column("features").combine_chunks()
        return pa.Table.from_struct_array(column).to_pandas()
    with open(path, "rb") as handle:
        rows = [orjson.loads(line)["features"] for line in handle if line.strip()]
    return pd.DataFrame.from_records(rows)


def main() -> None:
    current_path, reference_path = sys.argv[1], sys.argv[2]
    t0 = time.perf_counter()
    current, reference = features(current_path), features(reference_path)
    t1 = time.perf_counter()
    report = Report([DataDriftPreset(method="psi")])
    snapshot = report.run(current_data=current, reference_data=reference)
    t2 = time.perf_counter()
    assert snapshot is not None
    print(json.dumps({"load_s": t1 - t0, "run_s": t2 - t1, "rows": len(current), "features": current.shape[1]}))


if __name__ == "__main__":
    main()
