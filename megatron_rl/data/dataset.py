"""Prompt datasets (and SFT pairs) from JSONL or Parquet files.

Math rows have fields prompt and answer; code rows have prompt and tests (a list of test cases or its JSON
text, as the code reward takes them) and optionally fn_name (call-based problems). Rows of AceReason-Math,
DeepScaleR and LiveCodeBench are read in their own schemas (formats.py).

A bad row is reported with its line number and skipped; the skip count is kept for the run's log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.data.formats import normalise_row

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    pass


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str = ""
    tests: str | None = None  # code problems: test cases as JSON text
    fn_name: str | None = None


@dataclass
class PromptDataset:
    problems: list[Problem]
    path: str
    skipped: list[str] = field(default_factory=list)  # one message per skipped row

    def __len__(self) -> int:
        return len(self.problems)

    def train_problem(self, index: int) -> Problem:
        """Epochs cycle through the file in order; the index is the data position saved in checkpoints."""
        return self.problems[index % len(self.problems)]


def _check_row(row: object, where: str, kind: str) -> Problem | str:
    row = normalise_row(row, kind)
    if isinstance(row, str):
        return f"{where}: {row}"
    if not isinstance(row, dict):
        return f"{where}: row is not an object"
    required = ("prompt", "answer") if kind == "math" else ("prompt", "tests")
    for key in required:
        if key not in row:
            return f"{where}: missing field '{key}'"
    prompt = row["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        return f"{where}: field 'prompt' must be a non-empty string"
    if kind == "code":
        tests, fn_name = row["tests"], row.get("fn_name")
        if isinstance(tests, (list, dict)):
            tests = json.dumps(tests)
        if not isinstance(tests, str) or not tests.strip():
            return f"{where}: field 'tests' must be a list of test cases or its JSON text"
        if fn_name is not None and not isinstance(fn_name, str):
            return f"{where}: field 'fn_name' must be a string"
        return Problem(prompt=prompt, tests=tests, fn_name=fn_name or None)
    answer = row["answer"]
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        return f"{where}: field 'answer' must be a string or number"
    return Problem(prompt=prompt, answer=str(answer))


def _read_rows(path: Path):
    """(where, row) for each row of a JSONL or Parquet file; row is an error message for unreadable lines."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield where, f"{where}: not valid JSON ({e.__class__.__name__})"


def _load_rows(path: str | Path, check) -> tuple[list, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file '{path}' does not exist")
    kept: list = []
    skipped: list[str] = []
    for where, row in _read_rows(path):
        checked = row if isinstance(row, str) else check(row, where)
        (skipped if isinstance(checked, str) else kept).append(checked)
    for message in skipped:
        log.warning("skipped bad dataset row: %s", message)
    if not kept:
        raise DatasetError(f"dataset file '{path}' has no usable rows ({len(skipped)} skipped)")
    return kept, skipped


def load_prompt_dataset(path: str | Path, kind: str = "math") -> PromptDataset:
    """Rows for the `kind` of reward ("math" or "code"); bad rows are skipped and counted."""
    problems, skipped = _load_rows(path, lambda row, where: _check_row(row, where, kind))
    return PromptDataset(problems=problems, path=str(path), skipped=skipped)


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


def _check_sft_row(row: object, where: str) -> SFTExample | str:
    if not isinstance(row, dict):
        return f"{where}: row is not an object"
    for key in ("prompt", "response"):
        if key not in row:
            return f"{where}: missing field '{key}'"
        if not isinstance(row[key], str) or not row[key].strip():
            return f"{where}: field '{key}' must be a non-empty string"
    return SFTExample(prompt=row["prompt"], response=row["response"])


def load_sft_dataset(path: str | Path) -> tuple[list[SFTExample], list[str]]:
    """(prompt, response) pairs for `megatron-rl sft`; bad rows are skipped and counted."""
    return _load_rows(path, _check_sft_row)
