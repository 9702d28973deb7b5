"""Helpers shared by the benchmarks: cached data sets, and timing a command with its peak memory."""

from __future__ import annotations

import heapq
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / ".data"
sys.path.insert(0, str(ROOT))

from kdwatch.generator import TrafficSpec, generate  # noqa: E402


@dataclass
class Measure:
    seconds: float
    peak_rss_mb: float
    stdout: str


def measure(cmd: list[str]) -> Measure:
    """Run ``cmd``: wall seconds, its peak RSS (wait4 in benchmarks/peak.py) and its stdout."""
    wrapper = [sys.executable, str(ROOT / "benchmarks" / "peak.py"), *cmd]
    start = time.perf_counter()
    result = subprocess.run(wrapper, capture_output=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {result.stderr.decode()[-2000:]}")
    lines = result.stdout.decode().splitlines()
    peak_kb = int(lines[-1])
    return Measure(seconds, peak_kb / 1024.0, "\n".join(lines[:-1]))


def dataset(n: int, seed: int = 0, duplicates: float = 0.0) -> dict[str, Path]:
    """predictions/teacher/labels JSONL of ``n`` predictions (10 classes, 10 features, 10 % replays and labels).

    ``duplicates``: the share of records sent twice, as at-least-once producers do (the copy written
    1 to 200 records later in its file).
    """
    directory = DATA / (f"n{n}-s{seed}" + (f"-d{duplicates:g}" if duplicates else ""))
    paths = {k: directory / f"{k}.jsonl" for k in ("prediction", "teacher", "label")}
    if (directory / ".complete").exists():
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    handles = {k: p.open("wb") for k, p in paths.items()}
    spec = TrafficSpec(n_classes=10, n_features=10, teacher_rate=0.10, label_rate=0.10, events_per_second=200.0, seed=seed)
    rng = random.Random(seed)
    written = dict.fromkeys(paths, 0)
    again: dict[str, list[tuple[int, bytes]]] = {k: [] for k in paths}  # (due after this many records, value)
    for kind, _rid, value in generate(spec, n):
        handles[kind].write(value + b"\n")
        written[kind] += 1
        if duplicates and rng.random() < duplicates:
            heapq.heappush(again[kind], (written[kind] + rng.randint(1, 200), value))
        while again[kind] and again[kind][0][0] <= written[kind]:
            handles[kind].write(heapq.heappop(again[kind])[1] + b"\n")
    for kind, handle in handles.items():
        for _due, value in sorted(again[kind]):
            handle.write(value + b"\n")
        handle.close()
    (directory / ".complete").touch()
    return paths


def parquet_dataset(paths: dict[str, Path]) -> dict[str, Path]:
    """The same events as Parquet (`kdwatch convert`), cached beside the JSONL."""
    from kdwatch.collector.parquet_io import convert_jsonl

    out = {kind: path.with_suffix(".parquet") for kind, path in paths.items()}
    for kind, path in paths.items():
        done = path.with_suffix(".parquet.complete")
        if not done.exists():
            convert_jsonl(path, out[kind], kind)
            done.touch()
    return out


def py_spy() -> str:
    import shutil

    found = shutil.which("py-spy", path=str(ROOT / ".venv" / "bin")) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is needed: .venv/bin/pip install py-spy (make bench does)")
    return found


def _frame_name(frame: str) -> str:
    """``function (file)``; a C++ frame (--native) loses its template and argument lists."""
    name, _, where = frame.partition(" (")
    where = where.split(":")[0].split("/")[-1].rstrip(")")
    if "::" in name:
        name = name.split("<")[0].split("(")[0] + "<...>"
    return f"{name} ({where})" if where else name


def print_profile(raw: Path, title: str, top: int, root: str | None = None) -> None:
    """Tables of the functions with the most samples (own, then inclusive) from py-spy's raw output.

    ``root`` (a function name as printed): the inclusive table starts there, leaving out the
    start-up frames that hold it (they are in every sample and say nothing).
    """
    import collections

    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_frame_name(f) for f in stack.split(";")]
        n = int(count)
        total += n
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"\n{total} samples of {title}\n")
    ceiling = max((n for frame, n in inclusive.items() if root is not None and frame.startswith(root)), default=total)
    below = collections.Counter({frame: n for frame, n in inclusive.items() if n <= ceiling})
    for kind, counter in (("own time", own), ("inclusive time", below)):
        print(f"| function ({kind}) | share |")
        print("|---|---|")
        for frame, n in counter.most_common(top):
            print(f"| {frame} | {n / total:.1%} |")
        print()


# Reading and parsing every JSONL line of the files named on the command line with orjson, computing nothing:
# the floor any JSONL analysis pays.
FLOOR = """
import sys, orjson
n = 0
for path in sys.argv[1:]:
    with open(path, "rb") as handle:
        for line in handle:
            orjson.loads(line)
            n += 1
print(n)
"""


def median(values: list[float]) -> float:
    return statistics.median(values)
