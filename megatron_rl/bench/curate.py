"""Curation benchmark: `megatron-rl curate` on a 100k-row math file against benchmark files.

    python -m megatron_rl.bench.curate            # or: megatron-rl bench curate

Writes a synthetic training file (`--rows` rows of `--words` words drawn from a 20,000-word vocabulary, one in
100 carrying a 9-word run of a benchmark row, one in 50 a copy of an earlier row) and a benchmark file
(`--bench-rows` rows of 40 words), then times one curation (9-gram decontamination and exact dedup) and, as
the baseline measured in the same run, reading and writing the same rows with no check at all (the I/O and
JSON floor). Checks the counts against what was planted before printing. Prints the device, a markdown
table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_rl.bench.common import announce_device, load_average
from megatron_rl.data.curate import curate
from megatron_rl.data.dataset import _read_rows


def write_files(directory: Path, rows: int, words: int, bench_rows: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    vocab = [f"t{i}" for i in range(20000)]
    bench = [[rng.choice(vocab) for _ in range(40)] for _ in range(bench_rows)]
    with (directory / "bench.jsonl").open("w") as f:
        for b in bench:
            f.write(json.dumps({"problem": " ".join(b), "answer": "0"}) + "\n")
    planted = duplicates = 0
    texts: list[str] = []
    with (directory / "train.jsonl").open("w") as f:
        for i in range(rows):
            if i % 50 == 49 and texts:
                text = texts[rng.randrange(len(texts))]
                duplicates += 1
            else:
                seq = [rng.choice(vocab) for _ in range(words)]
                if i % 100 == 0:
                    source = bench[rng.randrange(bench_rows)]
                    start = rng.randrange(0, 40 - 9)
                    at = rng.randrange(0, words - 9)
                    seq[at : at + 9] = source[start : start + 9]
                    planted += 1
                text = " ".join(seq)
                if i % 100:
                    texts.append(text)
            f.write(json.dumps({"problem": text, "answer": str(i)}) + "\n")
    return {"planted": planted, "duplicates": duplicates}


def copy_rows(src: Path, dst: Path) -> int:
    """The baseline: read, parse and write every row, nothing else."""
    n = 0
    with dst.open("w") as out:
        for _, row in _read_rows(src):
            out.write(json.dumps(row) + "\n")
            n += 1
    return n


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-rl bench curate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--words", type=int, default=60, help="words per training row")
    parser.add_argument("--bench-rows", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.rows < 100 or args.words < 10 or args.bench_rows < 1:
        parser.error("--rows >= 100, --words >= 10 and --bench-rows >= 1")
    device, load_before = announce_device()
    with tempfile.TemporaryDirectory(prefix="benchcurate_") as tmp:
        d = Path(tmp)
        planted = write_files(d, args.rows, args.words, args.bench_rows)
        mb = (d / "train.jsonl").stat().st_size / 1e6
        start = time.perf_counter()
        copy_rows(d / "train.jsonl", d / "copy.jsonl")
        baseline_s = time.perf_counter() - start
        start = time.perf_counter()
        report = curate(d / "train.jsonl", d / "out", "math", [d / "bench.jsonl"], 9)
        curate_s = time.perf_counter() - start
    # Every planted overlap is found; a planted copy is a duplicate unless its original was contaminated.
    if report.contaminated < planted["planted"] or report.input_rows != args.rows:
        raise SystemExit(f"curate missed planted rows: {report} vs {planted}")
    result = {
        "device": device,
        "load_average_1min": [load_before, load_average()],
        "rows": args.rows,
        "words_per_row": args.words,
        "benchmark_rows": args.bench_rows,
        "mb": round(mb, 1),
        "curate_s": round(curate_s, 2),
        "rows_per_s": round(args.rows / curate_s),
        "baseline_read_write_s": round(baseline_s, 2),
        "planted_overlaps": planted["planted"],
        "contaminated": report.contaminated,
        "planted_copies": planted["duplicates"],
        "duplicates": report.duplicates,
        "kept": report.kept,
    }
    print("| what | s | rows/s |\n|---|---:|---:|")
    print(
        f"| curate ({args.rows} rows, {mb:.1f} MB, 9-gram vs {args.bench_rows} rows, dedup) | {curate_s:.2f} | {args.rows / curate_s:.0f} |"
    )
    print(f"| baseline: read + parse + write the rows | {baseline_s:.2f} | {args.rows / baseline_s:.0f} |")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
