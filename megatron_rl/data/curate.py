"""`megatron-rl curate`: remove training rows that overlap a benchmark, then exact duplicates, then (optionally)
rows a model finds too easy or never solves.

Words are the lowercased alphanumeric runs of a row's prompt (after mapping the dataset's schema, formats.py:
for LiveCodeBench rows the question and starter code). A row is contaminated when it shares any run of N
consecutive words with any benchmark row (N = 9 for math and 14 for code by default, the papers' choice); a
row whose word sequence equals an earlier kept row's is a duplicate (the first is kept). Rows that cannot be
read are removed too, with the reason. With a `Difficulty`, each remaining row is sampled k times with the
model through the evaluation path (evaluation/run.pass_counts: the trainer's sampling and reward) and kept
with its `pass_rate`, unless above `max_pass_rate` or, with `drop_unsolved`, never solved. Otherwise the kept
rows are written as they were read.
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
class Difficulty:
    """Grade the kept rows by how many of `k` samples of `model` solve them, and filter on it."""

    model: Path
    k: int = 8
    temperature: float = 0.6
    max_pass_rate: float | None = None  # remove rows solved more often (AceReason math: 6/16 for 24K/32K)
    drop_unsolved: bool = False  # remove rows no sample solved
    config: Path | None = None  # prompt template and reward settings (default: the model's run)


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
    too_easy: int = 0
    unsolved: int = 0
    too_long: int = 0
    solved_histogram: dict[str, int] = field(default_factory=dict)  # "c/k" -> rows with c of k solved
    difficulty_protocol: dict = field(default_factory=dict)


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
    input_path: Path,
    out_dir: Path,
    kind: str,
    benchmarks: Sequence[Path] = (),
    n: int | None = None,
    difficulty: Difficulty | None = None,
) -> CurateReport:
    """Write OUT_DIR/curated.jsonl (kept rows; with `difficulty`, each with its `pass_rate`) and
    OUT_DIR/removed.jsonl (each removed row with `removed`: why)."""
    n = n or DEFAULT_NGRAM[kind]
    if n < 1:
        raise ValueError(f"--ngram must be at least 1, got {n}")
    if not input_path.is_file():
        raise FileNotFoundError(f"input file '{input_path}' does not exist")
    index, bench_rows = benchmark_ngrams(benchmarks, kind, n)
    report = CurateReport(ngram=n, benchmark_rows=bench_rows, benchmarks=[str(p) for p in benchmarks])
    seen: dict[tuple[str, ...], str] = {}
    kept: list[tuple[str, dict]] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "removed.jsonl").open("w") as removed:

        def remove(row: object, why: object) -> None:
            removed.write(json.dumps({"row": row, "removed": why}) + "\n")

        for where, row in _read_rows(input_path):
            report.input_rows += 1
            text = None if isinstance(row, str) else prompt_of(row, kind)
            if text is None:
                report.unreadable += 1
                remove(
                    None if isinstance(row, str) else row,
                    row if isinstance(row, str) else f"{where}: no prompt",
                )
                continue
            seq = words(text)
            hit = next((g for g in ngrams(seq, n) if g in index), None) if index else None
            if hit is not None:
                report.contaminated += 1
                remove(
                    row,
                    {
                        "reason": "contaminated",
                        "where": where,
                        "ngram": " ".join(hit),
                        "benchmark": index[hit],
                    },
                )
                continue
            key = tuple(seq)
            if key in seen:
                report.duplicates += 1
                remove(row, {"reason": "duplicate", "where": where, "first": seen[key]})
                continue
            seen[key] = where
            kept.append((where, row))
        if difficulty is not None:
            kept = _grade(kept, kind, difficulty, report, remove)
    with (out_dir / "curated.jsonl").open("w") as f:
        for _, row in kept:
            f.write(json.dumps(row) + "\n")
    report.kept = len(kept)
    return report


def _grade(kept: list[tuple[str, dict]], kind: str, d: Difficulty, report: CurateReport, remove) -> list:
    """The rows of `kept` that pass the difficulty filter, each with its pass_rate; the others removed."""
    from megatron_rl.data.dataset import _check_row
    from megatron_rl.evaluation.run import pass_counts

    checked = [(where, row, _check_row(row, where, kind)) for where, row in kept]
    for _, row, problem in checked:
        if isinstance(problem, str):
            report.unreadable += 1
            remove(row, problem)
    gradable = [(where, row, problem) for where, row, problem in checked if not isinstance(problem, str)]
    results, report.difficulty_protocol = pass_counts(
        [p for _, _, p in gradable], kind, d.model, d.k, d.temperature, config=d.config
    )
    out = []
    for (where, row, _), result in zip(gradable, results, strict=True):
        if result is None:
            report.too_long += 1
            remove(row, {"reason": "prompt longer than rollout.max_prompt_tokens", "where": where})
            continue
        label = f"{result.correct}/{d.k}"
        report.solved_histogram[label] = report.solved_histogram.get(label, 0) + 1
        rate = result.correct / d.k
        if d.max_pass_rate is not None and rate > d.max_pass_rate:
            report.too_easy += 1
            remove(row, {"reason": "too_easy", "where": where, "solved": label})
        elif d.drop_unsolved and result.correct == 0:
            report.unsolved += 1
            remove(row, {"reason": "unsolved", "where": where, "solved": label})
        else:
            out.append((where, {**row, "pass_rate": rate}))
    report.solved_histogram = dict(
        sorted(report.solved_histogram.items(), key=lambda kv: int(kv[0].split("/")[0]))
    )
    return out
