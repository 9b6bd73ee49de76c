"""`megatron-rl curate`: remove training rows that overlap a benchmark, then exact duplicates.

Words are the lowercased alphanumeric runs of a row's prompt (after mapping the dataset's schema, formats.py:
for LiveCodeBench rows the question and starter code). A row is contaminated when it shares any run of N
consecutive words with any benchmark row (N = 9 for math and 14 for code by default, the papers' choice); a
row whose word sequence equals an earlier kept row's is a duplicate (the first is kept). Rows that cannot be
read are removed too, with the reason. The kept rows are written as they were read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.data.dataset import _read_rows
from megatron_rl.data.formats import normalise_row

DEFAULT_NGRAM = {"math": 9, "code": 14}
WORD = re.compile(r"[^\W_]+")  # runs of letters and digits (any script), no underscore


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(seq: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def prompt_of(row: object, kind: str) -> str | None:
    """The prompt text of a row in any known schema, or None when it has none."""
    row = normalise_row(row, kind)
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    return None


@dataclass
class CurateReport:
    input_rows: int = 0
    kept: int = 0
    contaminated: int = 0
    duplicates: int = 0
    unreadable: int = 0
    ngram: int = 0
    benchmark_rows: int = 0
    benchmarks: list[str] = field(default_factory=list)


def benchmark_ngrams(paths: Sequence[Path], kind: str, n: int) -> tuple[dict[tuple[str, ...], str], int]:
    """Every word N-gram of every benchmark row, with where it first occurs ("FILE:LINE"), and the row count."""
    index: dict[tuple[str, ...], str] = {}
    rows = 0
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"--decontaminate: benchmark file '{path}' does not exist")
        for where, row in _read_rows(path):
            text = prompt_of(row, kind) if not isinstance(row, str) else None
            if text is None:
                continue
            rows += 1
            for gram in ngrams(words(text), n):
                index.setdefault(gram, where)
    return index, rows


def curate(
    input_path: Path, out_dir: Path, kind: str, benchmarks: Sequence[Path] = (), n: int | None = None
) -> CurateReport:
    """Write OUT_DIR/curated.jsonl (kept rows) and OUT_DIR/removed.jsonl (each removed row with `removed`: why)."""
    n = n or DEFAULT_NGRAM[kind]
    if n < 1:
        raise ValueError(f"--ngram must be at least 1, got {n}")
    if not input_path.is_file():
        raise FileNotFoundError(f"input file '{input_path}' does not exist")
    index, bench_rows = benchmark_ngrams(benchmarks, kind, n)
    report = CurateReport(ngram=n, benchmark_rows=bench_rows, benchmarks=[str(p) for p in benchmarks])
    seen: dict[tuple[str, ...], str] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "curated.jsonl").open("w") as kept, (out_dir / "removed.jsonl").open("w") as removed:
        for where, row in _read_rows(input_path):
            report.input_rows += 1
            text = None if isinstance(row, str) else prompt_of(row, kind)
            if text is None:
                report.unreadable += 1
                reason = row if isinstance(row, str) else f"{where}: no prompt field this schema maps"
                removed.write(
                    json.dumps({"row": None if isinstance(row, str) else row, "removed": reason}) + "\n"
                )
                continue
            seq = words(text)
            hit = next((g for g in ngrams(seq, n) if g in index), None) if index else None
            if hit is not None:
                report.contaminated += 1
                why = {
                    "reason": "contaminated",
                    "where": where,
                    "ngram": " ".join(hit),
                    "benchmark": index[hit],
                }
                removed.write(json.dumps({"row": row, "removed": why}) + "\n")
                continue
            key = tuple(seq)
            if key in seen:
                report.duplicates += 1
                why = {"reason": "duplicate", "where": where, "first": seen[key]}
                removed.write(json.dumps({"row": row, "removed": why}) + "\n")
                continue
            seen[key] = where
            kept.write(json.dumps(row) + "\n")
            report.kept += 1
    return report
