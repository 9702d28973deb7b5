"""`kdwatch analyze` on a generative student's traffic: token sequences of mean length 64.

N predictions (default 1,000,000; 25 % with a teacher replay, 2 % audits) and a reference of 50,000,
as JSONL; `kdwatch analyze` computes every window field (token-level fidelity, PSI on the inputs and
on `_length` / `_mean_logprob`, latency, membership inference). Reported: median wall seconds of the
runs, sequences and tokens per second, peak RSS, and against the same run's floor (reading and parsing
every line with orjson, computing nothing).

    python benchmarks/generative_throughput.py [--n 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import sys

from common import DATA, FLOOR, ROOT, measure, median

sys.path.insert(0, str(ROOT))

from kdwatch.generator import GenerativeSpec, generate_generative

KDWATCH = str(ROOT / ".venv" / "bin" / "kdwatch")



def dataset(n: int, seed: int) -> dict[str, object]:
    directory = DATA / f"generative-n{n}-s{seed}"
    paths = {k: directory / f"{k}.jsonl" for k in ("prediction", "teacher")}
    if (directory / ".complete").exists():
        return paths  # type: ignore[return-value]
    directory.mkdir(parents=True, exist_ok=True)
    handles = {k: p.open("wb") for k, p in paths.items()}
    spec = GenerativeSpec(seed=seed, events_per_second=200.0, teacher_rate=0.25, audit_rate=0.02)
    for kind, _rid, value in generate_generative(spec, n):
        handles[kind].write(value + b"\n")
    for handle in handles.values():
        handle.close()
    (directory / ".complete").touch()
    return paths  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    paths = dataset(args.n, 0)
    reference = dataset(50_000, 1)["prediction"]
    tokens = 0
    with open(paths["teacher"], "rb") as handle:  # type: ignore[call-overload]
        for line in handle:
            tokens += line.count(b",", line.index(b'"top1"')) + 1
    analyze = [KDWATCH, "analyze", "--predictions", str(paths["prediction"]), "--teacher", str(paths["teacher"]),
               "--reference", str(reference)]
    floor = [sys.executable, "-c", FLOOR, str(paths["prediction"]), str(paths["teacher"])]
    runs = [measure(analyze) for _ in range(args.runs)]
    floors = [measure(floor) for _ in range(args.runs)]
    seconds, floor_s = median([r.seconds for r in runs]), median([f.seconds for f in floors])
    windows = runs[0].stdout.count('"window_start"')
    print(f"\n`kdwatch analyze`, {args.n:,} generative predictions (mean length 64), {tokens:,} teacher-scored tokens, "
          f"{windows} windows; medians of {args.runs} runs\n")
    print("| | seconds | sequences/s | scored tokens/s | peak RSS MB |")
    print("|---|---|---|---|---|")
    print(f"| kdwatch analyze | {seconds:.1f} | {args.n / seconds:,.0f} | {tokens / seconds:,.0f} | "
          f"{max(r.peak_rss_mb for r in runs):.0f} |")
    print(f"| floor: orjson parse of every line | {floor_s:.1f} | {args.n / floor_s:,.0f} | | |")
    print(f"\nanalyze / floor: {seconds / floor_s:.2f}x the parsing time")


if __name__ == "__main__":
    main()
