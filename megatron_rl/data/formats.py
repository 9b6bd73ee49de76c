"""The published datasets' row schemas, mapped onto the fields the trainer reads (dataset.py).

- math: `prompt` and `answer`, or AceReason-Math's and DeepScaleR's `problem` and `answer` (DeepScaleR's
  `solution` is not used);
- code: `prompt`, `tests` and optionally `fn_name`, or LiveCodeBench's rows: `question_content` (with
  `starter_code` appended when there is one), `public_test_cases` (JSON text), `private_test_cases` (JSON
  text, or the dataset's base64 of a zlib-compressed pickle of that JSON text) and `metadata` (JSON text whose
  `func_name` names the function of a functional problem).

A row that cannot be mapped gives a message naming the field; the caller skips and counts it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import zlib

STARTER_CODE_HEADER = "Use the following starter code:"


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles strings, numbers and containers only: a dataset's pickle that names any class or function
    (which unpickling would import and may call) is refused, not run."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused: the pickle references {module}.{name}")


def decode_lcb_tests(text: str) -> list:
    """LiveCodeBench test cases from a `*_test_cases` field: JSON text, else base64(zlib(pickle(JSON text)))."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
        inner = _PlainDataUnpickler(io.BytesIO(raw)).load()
    except (
        binascii.Error,
        zlib.error,
        UnicodeEncodeError,
        pickle.UnpicklingError,
        EOFError,
        ValueError,
    ) as e:
        raise ValueError(f"neither JSON nor base64 zlib pickle ({e})") from None
    return json.loads(inner) if isinstance(inner, (str, bytes)) else inner


def _lcb_code_row(row: dict) -> dict | str:
    content = row.get("question_content")
    if not isinstance(content, str) or not content.strip():
        return "field 'question_content' must be a non-empty string"
    tests: list = []
    for field in ("public_test_cases", "private_test_cases"):
        value = row.get(field)
        if value in (None, ""):
            continue
        try:
            cases = decode_lcb_tests(value) if isinstance(value, str) else value
        except ValueError as e:
            return f"field '{field}': {e}"
        if not isinstance(cases, list):
            return f"field '{field}' must hold a list of test cases"
        tests.extend(cases)
    if not tests:
        return "fields 'public_test_cases' and 'private_test_cases' hold no test case"
    fn_name = None
    if row.get("metadata"):
        try:
            metadata = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
        except json.JSONDecodeError:
            return "field 'metadata' is not valid JSON"
        fn_name = metadata.get("func_name") if isinstance(metadata, dict) else None
    if any(isinstance(t, dict) and t.get("testtype") == "functional" for t in tests) and not fn_name:
        return "functional tests need field 'metadata' with a func_name"
    prompt = content
    starter = row.get("starter_code")
    if isinstance(starter, str) and starter.strip():
        prompt = f"{content}\n\n{STARTER_CODE_HEADER}\n```python\n{starter.rstrip()}\n```"
    return {"prompt": prompt, "tests": tests, "fn_name": fn_name}


def normalise_row(row: object, kind: str) -> object:
    """`row` in the trainer's fields when it is in one of the known schemas (else as it is), or a message
    naming the field that cannot be read."""
    if not isinstance(row, dict) or "prompt" in row:
        return row
    if kind == "code" and "question_content" in row:
        return _lcb_code_row(row)
    if kind == "math" and "problem" in row:
        return {"prompt": row["problem"], "answer": row.get("answer")} if "answer" in row else row
    return row
