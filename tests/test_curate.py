"""`megatron-rl curate`: planted benchmark overlaps of N words or more are removed, near misses of N - 1 kept,
exact duplicates removed after the first, unreadable rows reported; every removal says why."""

from __future__ import annotations

import json
import random

from typer.testing import CliRunner

from megatron_rl.cli import app
from megatron_rl.data.curate import curate, words

VOCAB = [f"w{i}" for i in range(5000)]


def sentence(rng: random.Random, length: int) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(length)]


def test_planted_overlaps_are_found_and_near_misses_kept(tmp_path):
    rng = random.Random(0)
    n = 9
    bench = [sentence(rng, 40) for _ in range(20)]
    (tmp_path / "bench.jsonl").write_text(
        "".join(json.dumps({"problem": " ".join(b), "answer": "1"}) + "\n" for b in bench)
    )
    rows, expect_removed, expect_kept = [], [], []
    for i in range(200):
        source = bench[i % len(bench)]
        length = [n, n + 5, n - 1, 0][i % 4]  # overlap with a benchmark row: N, more, a near miss, none
        start = rng.randrange(0, len(source) - length + 1)
        # Punctuation and case around the planted words do not hide them (words are lowercased runs).
        planted = " ".join(source[start : start + length]).upper().replace(" ", ", ")
        text = f"{' '.join(sentence(rng, 15))} {planted} {' '.join(sentence(rng, 15))}"
        rows.append({"prompt": text, "answer": str(i)})
        (expect_removed if length >= n else expect_kept).append(str(i))
    rows.append(dict(rows[2]))  # an exact duplicate of a kept near miss (row 2 plants N - 1 words)
    rows.append({"prompt": "  " + rows[6]["prompt"].lower() + "!", "answer": "dup"})  # same words
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + "{not json\n" + json.dumps({"question": "?"}) + "\n"
    )
    report = curate(tmp_path / "train.jsonl", tmp_path / "out", "math", [tmp_path / "bench.jsonl"], n)

    kept = [json.loads(line) for line in (tmp_path / "out" / "curated.jsonl").read_text().splitlines()]
    removed = [json.loads(line) for line in (tmp_path / "out" / "removed.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in kept] == expect_kept
    assert (
        report.contaminated == len(expect_removed) == 100
        and report.duplicates == 2
        and report.unreadable == 2
    )
    assert report.input_rows == len(rows) + 2 and report.kept == len(expect_kept)
    contaminated = [
        r for r in removed if isinstance(r["removed"], dict) and r["removed"]["reason"] == "contaminated"
    ]
    assert sorted(r["row"]["answer"] for r in contaminated) == sorted(expect_removed)
    first = contaminated[0]["removed"]
    assert len(first["ngram"].split()) == n and first["benchmark"].startswith(
        str(tmp_path / "bench.jsonl") + ":"
    )
    assert all(set(r["removed"]["ngram"].split()) <= set(words(r["row"]["prompt"])) for r in contaminated)
    duplicates = [
        r["removed"]
        for r in removed
        if isinstance(r["removed"], dict) and r["removed"]["reason"] == "duplicate"
    ]
    assert [d["first"] for d in duplicates] == [
        f"{tmp_path / 'train.jsonl'}:3",
        f"{tmp_path / 'train.jsonl'}:7",
    ]
    assert any("not valid JSON" in str(r["removed"]) for r in removed)


def test_cli_prints_counts_and_names_a_missing_file(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "Add one and one.", "answer": "2"}) + "\n")
    result = CliRunner().invoke(app, ["curate", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["input_rows"] == line["kept"] == 1 and line["kind"] == "math" and line["ngram"] == 9
    missing = CliRunner().invoke(
        app,
        [
            "curate",
            str(tmp_path / "train.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--decontaminate",
            "nope.jsonl",
        ],
    )
    assert missing.exit_code == 2 and "benchmark file 'nope.jsonl' does not exist" in missing.output


def test_curate_benchmark_finds_what_it_planted(capsys):
    from megatron_rl.bench.curate import main

    assert main(["--rows", "2000", "--bench-rows", "50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device: ") and any(line.startswith("| curate (2000 rows") for line in lines)
    result = json.loads(lines[-1])
    assert result["contaminated"] == result["planted_overlaps"] == 20
    assert result["duplicates"] == result["planted_copies"] == 40
    assert result["kept"] == 2000 - 20 - 40 and result["curate_s"] > 0 and result["baseline_read_write_s"] > 0
