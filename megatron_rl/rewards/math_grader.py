"""Binary math reward: the last \\boxed{...} of the final answer, checked against the reference (math-verify).

The only entry point the trainer needs is `math_reward(response, answer)`. It never raises: anything that goes
wrong (no box, unbalanced braces, undecodable bytes, a parse error, a timeout) scores 0.

Timeouts: math-verify's own timeouts are whole seconds of `signal.alarm`, armed separately for each parse and
comparison. Here one float deadline (`setitimer`) covers the whole sample instead, and math-verify's are off.
Signals only reach the main thread, and a SymPy call stuck inside C code ignores them, so the hard guarantee
comes from `RewardPool`, which kills a worker process that overruns; called directly from another thread,
`math_reward` has no timeout at all.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
from fractions import Fraction
from typing import Any

THINK_END = "</think>"


def unfinished_response(text: str, finish_reason: str | None, require_think: bool = False) -> bool:
    """Whether a response scores 0 without being graded: cut off at the length limit before its reasoning
    closed (no `</think>`), or, with `require_think`, one that never closed its reasoning at all. A box or code
    block in such a response was written mid-thought, not the answer the model committed to."""
    if THINK_END in text:
        return False
    return finish_reason == "length" or require_think


BOXED = "\\boxed"
# Longer boxed contents are not answers, and parsing them would only burn the time budget.
MAX_ANSWER_CHARS = 1000
DEFAULT_MATH_TIMEOUT = 5.0

# math-verify warns once when its signal timeouts are disabled (we disable them on purpose, see above) and on
# every timeout; neither belongs in a training log.
logging.getLogger("math_verify").setLevel(logging.ERROR)


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException, so math-verify's `except Exception` cannot eat it."""


def final_answer_region(response: str) -> str:
    """The text after the last </think>, or the whole response when the model wrote no </think>."""
    cut = response.rfind(THINK_END)
    return response if cut < 0 else response[cut + len(THINK_END) :]


def _is_escaped(text: str, i: int) -> bool:
    """True when text[i] follows an odd number of backslashes (a LaTeX \\{ or \\} is not a group brace)."""
    n = 0
    while i - n - 1 >= 0 and text[i - n - 1] == "\\":
        n += 1
    return n % 2 == 1


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} in text, nested braces included; None if absent or unbalanced.

    Only the last occurrence counts: an earlier box is a draft the model revised, and falling back to it when
    the last one is cut off would reward a truncated response. One linear scan, so a 1 MB response is cheap.
    """
    start = text.rfind(BOXED)
    while start >= 0 and text[start + len(BOXED) : start + len(BOXED) + 1].isalpha():
        # \boxedfoo is another macro, not \boxed; look further back.
        start = text.rfind(BOXED, 0, start)
    if start < 0:
        return None
    i = start + len(BOXED)
    while i < len(text) and text[i] in " \t\n":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{" and not _is_escaped(text, j):
            depth += 1
        elif c == "}" and not _is_escaped(text, j):
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_math_answer(response: str) -> str | None:
    """The final answer a response commits to: the last boxed expression after </think>."""
    return last_boxed(final_answer_region(response))


def _squash(s: str) -> str:
    return "".join(s.split())


_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_SLASH = re.compile(r"([+-]?\d+)/(\d+)")
_LATEX_FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{(\d+)\}")


def _exact_number(text: str) -> tuple[Fraction, bool] | None:
    """(value, is_integer) for a plain integer, decimal, a/b or \\frac{a}{b}; None for anything else."""
    s = text.strip().strip("$").strip()  # inner spaces are not squashed: "1 2" is not 12
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s), "." not in s
        if m := _SLASH.fullmatch(s):
            return Fraction(int(m[1]), int(m[2])), False
        if m := _LATEX_FRAC.fullmatch(s):
            value = Fraction(int(m[2]), int(m[3]))
            return (-value if m[1] == "-" else value), False
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _numeric_shortcut(content: str, answer: str) -> bool | None:
    """Decide plain-number answers without SymPy (most competition answers are integers or fractions).

    Equal exact values are a match; two different integers are not. Anything else (e.g. 0.333 vs 1/3, where
    math-verify rounds) is left to math-verify, so the shortcut never disagrees with it.
    """
    a, b = _exact_number(content), _exact_number(answer)
    if a is None or b is None:
        return None
    if a[0] == b[0]:
        return True
    return False if a[1] and b[1] else None


def _use_two_stage_latex_parsing() -> None:
    """Make latex2sympy's ANTLR parser try SLL prediction first and fall back to full LL on any error.

    This is ANTLR's standard two-stage strategy: an SLL parse that succeeds is the parse LL would return
    (ANTLR documents this guarantee), and SLL skips the full-context prediction that dominates the cost of
    parsing intervals and sets (5-6 ms -> ~1 ms each here). Any error, in parsing or in converting the tree,
    reruns the original LL path, so results cannot change. Applied once per process; skipped if latex2sympy
    changed shape.
    """
    try:
        from antlr4.atn.PredictionMode import PredictionMode
        from latex2sympy2_extended import latex2sympy2 as l2s

        cls = l2s._Latex2Sympy
        ll_create, ll_parse = cls.create_parser, cls.parse
    except (ImportError, AttributeError):
        return
    if getattr(cls, "_two_stage", False):
        return

    def create_parser(self: Any, latex_str: str) -> Any:
        parser = ll_create(self, latex_str)
        if getattr(self, "_sll_first", False):
            parser._interp.predictionMode = PredictionMode.SLL
        return parser

    def parse(self: Any, latex_str: str) -> Any:
        self._sll_first = True
        try:
            return ll_parse(self, latex_str)
        except Exception:
            pass
        finally:
            self._sll_first = False
        return ll_parse(self, latex_str)

    cls._ll_parse = ll_parse  # kept for the test that checks both paths agree
    cls.create_parser, cls.parse, cls._two_stage = create_parser, parse, True


@functools.lru_cache(maxsize=8192)
def _parse_reference(answer: str) -> list[Any]:
    """Parse a reference answer once: the trainer scores n samples of each prompt against the same one."""
    from math_verify import parse

    text = answer.strip()
    if "$" not in text and BOXED not in text:
        # A bare reference like "\\frac{1}{2}" or "[1, 2)": math-verify finds LaTeX inside math delimiters.
        text = f"${text}$"
    return parse(text, parsing_timeout=None)


@functools.lru_cache(maxsize=8192)
def _parse_prediction(content: str) -> list[Any]:
    """Parse a boxed answer; cached, since the samples of one prompt often agree on an answer."""
    from math_verify import parse

    return parse(f"{BOXED}{{{content}}}", parsing_timeout=None)


@functools.lru_cache(maxsize=8192)
def _verify(content: str, answer: str) -> bool:
    """Cached too: a group's samples repeat answers, and a symbolic comparison can cost ~100 ms. A deadline
    exception is not cached (lru_cache stores only returned values)."""
    from math_verify import verify

    gold = _parse_reference(answer)
    if not gold:
        return False
    pred = _parse_prediction(content)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=None))


_READY: list[bool] = []
_WARM_UP = [  # one of each kind of comparison, so that SymPy's lazily imported submodules are loaded
    ("$x^2+2x+1$", r"\boxed{(x+1)^2}"),
    ("$[1, 2)$", r"\boxed{[1,2)}"),
    (r"$50\%$", r"\boxed{0.5}"),
    (r"$\{1, 2\}$", r"\boxed{\sqrt{2}}"),
]


def _load_math_verify() -> None:
    """Import math-verify and SymPy and run a few comparisons OUTSIDE any deadline: a deadline that fires in
    the middle of an import (math-verify's first import takes ~0.6 s; SymPy imports submodules on first use)
    would leave half-initialised modules behind and break every later sample of the process."""
    if _READY:
        return
    from math_verify import parse, verify

    _use_two_stage_latex_parsing()
    for gold, pred in _WARM_UP:
        verify(parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None), timeout_seconds=None)
    _READY.append(True)


def _call_with_deadline(fn: Any, seconds: float, *args: Any) -> Any:
    """Run fn(*args) under a SIGALRM deadline when on the main thread; restore any timer set before."""
    if seconds is None or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return fn(*args)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Deadline()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *old_timer)


def _to_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return None


def math_reward(response: str | bytes, answer: str | bytes, timeout: float = DEFAULT_MATH_TIMEOUT) -> float:
    """1.0 if the last boxed answer (after </think>) equals the reference, else 0.0. Never raises."""
    return 1.0 if math_reward_detail(response, answer, timeout)[0] else 0.0


def math_reward_detail(
    response: str | bytes, answer: str | bytes, timeout: float = DEFAULT_MATH_TIMEOUT
) -> tuple[bool, str]:
    """(correct, why): why is one of ok, wrong, no_box, too_long, bad_input, timeout, error."""
    try:
        text, ref = _to_text(response), _to_text(answer)
        if text is None or ref is None:
            return False, "bad_input"
        content = extract_math_answer(text)
        if content is None:
            return False, "no_box"
        if len(content) > MAX_ANSWER_CHARS:
            return False, "too_long"
        # Lone surrogates (from bytes decoded with surrogateescape upstream) break the LaTeX lexer; drop them.
        content = content.encode("utf-8", errors="ignore").decode("utf-8")
        ref = ref.encode("utf-8", errors="ignore").decode("utf-8")
        if content.strip() and _squash(content) == _squash(ref):
            return True, "ok"  # the common exact case needs no SymPy
        shortcut = _numeric_shortcut(content, ref)
        if shortcut is not None:
            return (True, "ok") if shortcut else (False, "wrong")
        _load_math_verify()
        ok = _call_with_deadline(_verify, timeout, content, ref)
        return (True, "ok") if ok else (False, "wrong")
    except _Deadline:
        return False, "timeout"
    except RecursionError:
        return False, "error"
    except Exception:
        return False, "error"
