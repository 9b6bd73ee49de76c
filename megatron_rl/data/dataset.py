"""Prompt datasets from JSONL or Parquet files.

Math rows have fields prompt and answer; code rows have prompt and tests (a list of test cases or its JSON
text, as the code reward takes them) and optionally fn_name (call-based problems).

A bad row is reported with its line number and skipped; the skip count is kept for the run's log.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

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


def load_prompt_dataset(path: str | Path, kind: str = "math") -> PromptDataset:
    """Rows for the `kind` of reward ("math" or "code"); bad rows are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file '{path}' does not exist")
    problems: list[Problem] = []
    skipped: list[str] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            checked = _check_row(row, f"{path} row {i}", kind)
            (problems if isinstance(checked, Problem) else skipped).append(checked)
    else:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    skipped.append(f"{where}: not valid JSON ({e.__class__.__name__})")
                    continue
                checked = _check_row(row, where, kind)
                (problems if isinstance(checked, Problem) else skipped).append(checked)
    for message in skipped:
        log.warning("skipped bad dataset row: %s", message)
    if not problems:
        raise DatasetError(f"dataset file '{path}' has no usable rows ({len(skipped)} skipped)")
    return PromptDataset(problems=problems, path=str(path), skipped=skipped)
