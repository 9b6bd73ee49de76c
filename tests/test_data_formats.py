"""The published datasets' schemas: AceReason-Math and DeepScaleR math rows (JSONL, Parquet) and LiveCodeBench
code rows (public tests as JSON, private tests as base64 zlib pickle, functional problems), from sample files
written here with the same fields; bad rows skipped with their line and field, good rows all kept."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rl.data.dataset import load_prompt_dataset
from megatron_rl.data.formats import STARTER_CODE_HEADER, decode_lcb_tests
from megatron_rl.rewards import parse_tests


def lcb_private(cases: list) -> str:
    """How LiveCodeBench's code_generation_lite stores private test cases."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode("utf-8")


def test_acereason_math_jsonl_and_deepscaler_parquet(tmp_path):
    jsonl = tmp_path / "acereason_math.jsonl"
    jsonl.write_text(
        json.dumps({"problem": "Find $x$ if $2x=6$.", "answer": "3"}) + "\n"
        + json.dumps({"problem": "No answer here."}) + "\n"
        + json.dumps({"problem": "What is $1/2+1/2$?", "answer": 1}) + "\n"
    )  # fmt: skip
    data = load_prompt_dataset(jsonl, "math")
    assert [(p.prompt, p.answer) for p in data.problems] == [
        ("Find $x$ if $2x=6$.", "3"),
        ("What is $1/2+1/2$?", "1"),
    ]
    assert len(data.skipped) == 1 and f"{jsonl}:2: missing field 'prompt'" in data.skipped[0]

    parquet = tmp_path / "deepscaler.parquet"
    rows = {
        "problem": ["Compute $3^2$.", "Compute $2^5$."],
        "answer": ["9", "32"],
        "solution": ["...", "..."],
    }
    pq.write_table(pa.table(rows), parquet)
    data = load_prompt_dataset(parquet, "math")
    assert [(p.prompt, p.answer) for p in data.problems] == [
        ("Compute $3^2$.", "9"),
        ("Compute $2^5$.", "32"),
    ]


def test_livecodebench_rows(tmp_path):
    stdin_public = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    stdin_private = [{"input": "5 7\n", "output": "12\n", "testtype": "stdin"}] * 3
    functional = [{"input": "[1, 2]", "output": "3", "testtype": "functional"}]
    good_stdin = {
        "question_title": "A+B", "question_content": "Read two integers and print their sum.",
        "platform": "atcoder", "starter_code": "", "difficulty": "easy",
        "public_test_cases": json.dumps(stdin_public), "private_test_cases": lcb_private(stdin_private),
        "metadata": "{}",
    }  # fmt: skip
    good_functional = {
        "question_content": "Return the sum of a list.", "starter_code": "class Solution:\n    def total(self, xs):\n",
        "public_test_cases": json.dumps(functional), "private_test_cases": lcb_private(functional),
        "metadata": json.dumps({"func_name": "total"}),
    }  # fmt: skip

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = [
        {**good_stdin, "private_test_cases": "not base64 and not json"},
        {**good_stdin, "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()},
        {**good_functional, "metadata": "{}"},
        {**good_stdin, "question_content": ""},
    ]
    path = tmp_path / "lcb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good_stdin, *bad, good_functional]))
    data = load_prompt_dataset(path, "code")

    assert len(data.problems) == 2  # no good row lost
    stdin, func = data.problems
    assert stdin.prompt == good_stdin["question_content"] and stdin.fn_name is None
    assert parse_tests(stdin.tests, stdin.fn_name).inputs == ("1 2\n", "5 7\n", "5 7\n", "5 7\n")
    assert func.fn_name == "total" and STARTER_CODE_HEADER in func.prompt and "def total" in func.prompt
    tests = parse_tests(func.tests, func.fn_name)
    assert tests.functional and tests.fn_name == "total"

    assert len(data.skipped) == 4
    messages = "\n".join(data.skipped)
    assert f"{path}:2: field 'private_test_cases': neither JSON nor base64 zlib pickle" in messages
    assert (
        f"{path}:3: field 'private_test_cases'" in messages and "refused: the pickle references" in messages
    )
    assert f"{path}:4: functional tests need field 'metadata' with a func_name" in messages
    assert f"{path}:5: field 'question_content' must be a non-empty string" in messages


def test_decode_lcb_tests_both_encodings():
    cases = [{"input": "x", "output": "y", "testtype": "stdin"}]
    assert decode_lcb_tests(json.dumps(cases)) == cases == decode_lcb_tests(lcb_private(cases))
    with pytest.raises(ValueError, match="neither JSON nor base64 zlib pickle"):
        decode_lcb_tests("%%%")
