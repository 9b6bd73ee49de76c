"""Math reward: hand-checked (response, reference, expected reward) cases, garbage input, timeouts, pool."""

from __future__ import annotations

import time

import pytest

from megatron_rl.rewards import RewardPool, extract_math_answer, last_boxed, math_reward, math_reward_detail

T = "<think>Let me work it out.</think>"  # a reasoning prefix; the answer comes after it

# Each case was checked by hand: the expected reward is what a careful grader would give.
CASES = [
    # fractions
    (T + r"The answer is $\boxed{\frac{1}{2}}$.", "1/2", 1),
    (T + r"\boxed{0.5}", r"\frac{1}{2}", 1),
    (T + r"\boxed{\dfrac{3}{4}}", "0.75", 1),
    (T + r"\boxed{\frac{2}{4}}", r"\frac12", 1),
    (T + r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", 0),
    (T + r"\boxed{-\frac{5}{2}}", "-2.5", 1),
    (T + r"\boxed{\tfrac{7}{3}}", "7/3", 1),
    (T + r"\boxed{7/3}", r"\frac{7}{4}", 0),
    # radicals
    (T + r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1),
    (T + r"\boxed{\sqrt{3}/2}", r"\frac{\sqrt{3}}{2}", 1),
    (T + r"\boxed{\sqrt{2}}", r"\sqrt{3}", 0),
    (T + r"\boxed{3\sqrt[3]{2}}", r"\sqrt[3]{54}", 1),
    (T + r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", 1),
    # intervals
    (T + r"\boxed{[1, 2)}", "[1,2)", 1),
    (T + r"\boxed{(1, 2]}", "[1,2)", 0),
    (T + r"\boxed{(-\infty, 3]}", r"(-\infty,3]", 1),
    (T + r"\boxed{(0,\infty)}", r"(0, \infty)", 1),
    (T + r"\boxed{[0, 1] \cup [2, 3]}", r"[0,1]\cup[2,3]", 1),
    (T + r"\boxed{[0, 1] \cup [2, 4]}", r"[0,1]\cup[2,3]", 0),
    # sets
    (T + r"\boxed{\{1, 2, 3\}}", r"\{3, 2, 1\}", 1),
    (T + r"\boxed{\{1, 2\}}", r"\{1, 2, 3\}", 0),
    (T + r"\boxed{1, 2}", r"\{1,2\}", 1),
    # percentages
    (T + r"\boxed{50\%}", "50", 1),
    (T + r"\boxed{25\%}", "0.25", 1),
    (T + r"\boxed{40\%}", r"50\%", 0),
    # equivalent expressions
    (T + r"\boxed{x^2+2x+1}", "(x+1)^2", 1),
    (T + r"\boxed{2x+2}", "2(x+1)", 1),
    (T + r"\boxed{x^2-1}", "(x-1)(x+1)", 1),
    (T + r"\boxed{x^2+1}", "(x+1)^2", 0),
    (T + r"\boxed{\sin(\pi/6)}", r"\frac12", 1),
    (T + r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}2", 1),
    # integers, decimals, constants, plain text
    (T + r"\boxed{42}", "42", 1),
    (T + r"\boxed{41}", "42", 0),
    (T + r"\boxed{1{,}000}", "1000", 1),
    (T + r"\boxed{10.0}", "10", 1),
    (T + r"\boxed{\pi}", r"\pi", 1),
    (T + r"\boxed{3.14}", r"\pi", 0),
    (T + r"\boxed{x = 3}", "3", 1),
    (T + r"\boxed{\text{(B)}}", "B", 1),
    (T + r"\boxed{C}", "B", 0),
    (T + r"\boxed {5}", "5", 1),  # a space before the brace is still \boxed
    (T + r"\boxed{12}", "$12$", 1),  # references with their own delimiters
    (T + r"\boxed{12}", r"\boxed{12}", 1),
    # which box counts
    (T + r"First \boxed{3}; wait, actually \boxed{4}.", "4", 1),
    (T + r"\boxed{4}... no: \boxed{3}.", "4", 0),
    (r"<think>so \boxed{7}</think>The answer is 7.", "7", 0),  # a box before </think> only
    (r"<think>scratch \boxed{5}</think> final \boxed{7}", "7", 1),
    (r"<think>scratch \boxed{7}</think> final \boxed{5}", "7", 0),
    (r"No think block here, so \boxed{7}", "7", 1),
    # missing or malformed boxes
    (T + "The answer is 7.", "7", 0),
    ("", "7", 0),
    (T + r"\boxed{\frac{1}{2}", "1/2", 0),  # unbalanced: cut off mid-answer
    (T + r"\boxed{}", "7", 0),
    (T + r"\boxedfoo{7}", "7", 0),  # not \boxed
]


@pytest.mark.parametrize("response,answer,expected", CASES)
def test_math_cases(response: str, answer: str, expected: int) -> None:
    assert math_reward(response, answer) == float(expected)


def test_enough_hand_checked_cases() -> None:
    assert len(CASES) >= 40
    assert {e for _, _, e in CASES} == {0, 1}


def test_extraction() -> None:
    assert last_boxed(r"a \boxed{\frac{1}{2}} b \boxed{\left\{1,2\right\}}") == r"\left\{1,2\right\}"
    assert last_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert last_boxed(r"\boxed{\{x\}}") == r"\{x\}"  # escaped braces are not groups
    assert last_boxed(r"\boxed{1") is None
    assert extract_math_answer(r"\boxed{1}</think>") is None
    assert extract_math_answer(r"<think>\boxed{1}</think>\boxed{2}") == "2"


GARBAGE = [
    pytest.param(b"\xff\xfe\x80\x81 \xc3\x28 garbage", "7", id="non-utf8-bytes"),
    pytest.param(b"</think>\\boxed{\xff\xfe}", "7", id="non-utf8-in-box"),
    pytest.param("\\boxed{\udcff\udc80}", "7", id="lone-surrogates"),
    pytest.param("x" * (1 << 20), "7", id="1MB-no-box"),
    pytest.param("{" * (1 << 20) + r"\boxed{7", "7", id="1MB-unbalanced"),
    pytest.param(r"\boxed{" * (1 << 17), "7", id="many-open-boxes"),
    pytest.param(r"\boxed{" + "{" * 5000 + "7" + "}" * 5000 + "}", "7", id="deep-nesting"),
    pytest.param("}}}{{{" * 1000 + r"\boxed{}}}}", "7", id="stray-braces"),
    pytest.param(None, "7", id="not-a-string"),
    pytest.param(r"\boxed{7}", None, id="reference-not-a-string"),
    pytest.param(r"\boxed{\frac{\frac{\frac{}{}}}{}}", "7", id="malformed-latex"),
]


@pytest.mark.parametrize("response,answer", GARBAGE)
def test_garbage_scores_zero_quickly(response, answer) -> None:
    start = time.monotonic()
    assert math_reward(response, answer, timeout=2.0) == 0.0
    assert time.monotonic() - start < 6.0


def test_pathological_answer_times_out() -> None:
    # SymPy evaluates the power tower eagerly; the per-sample deadline stops it.
    start = time.monotonic()
    ok, why = math_reward_detail(T + r"\boxed{9^{9^{9^{9}}}}", "1", timeout=1.0)
    assert (ok, why) == (False, "timeout")
    assert time.monotonic() - start < 5.0


def test_pool_scores_batches_and_survives_hangs() -> None:
    responses = [T + r"\boxed{\frac{1}{2}}", T + r"\boxed{3}", "no box", T + r"\boxed{2^{2^{40}}}"] * 3
    answers = ["0.5", "4", "1", "5"] * 3
    with RewardPool(workers=2, math_timeout=1.0) as pool:
        start = time.monotonic()
        assert pool.score_math(responses, answers) == [1.0, 0.0, 0.0, 0.0] * 3
        assert time.monotonic() - start < 20
        # The pool is reusable: a second batch on the same workers.
        assert pool.score_math([T + r"\boxed{[1,2)}"], ["[1, 2)"]) == [1.0]
        detailed = pool.score_math_detailed([T + r"\boxed{9^{9^{9^{9}}}}", "x"], ["5", "x"])
        assert detailed == [(0.0, "timeout"), (0.0, "no_box")]


def test_two_stage_latex_parsing_gives_the_ll_parse() -> None:
    # math_grader makes latex2sympy try ANTLR's fast SLL prediction first; the tree must be the LL one.
    from latex2sympy2_extended import latex2sympy2 as l2s
    from sympy import srepr

    from megatron_rl.bench.rewards import _TEMPLATES

    math_reward(T + r"\boxed{\frac{1}{2}}", "0.5")  # installs the two-stage parser
    cls = l2s._Latex2Sympy
    assert cls._two_stage
    texts = {t for r, a, _ in CASES for t in (extract_math_answer(r), a) if t}
    for template in _TEMPLATES:
        ref, right, wrong = template(7)
        texts.update([ref, *right, *wrong])

    def outcome(parse, text):
        try:
            return srepr(parse(cls(), text))
        except Exception as e:
            return type(e).__name__

    for text in sorted(texts):
        assert outcome(cls.parse, text) == outcome(cls._ll_parse, text), text
