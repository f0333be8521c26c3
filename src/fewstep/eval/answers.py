"""Final-answer extraction and checking for the math tasks (GSM8K and MATH-500).

GSM8K: the number after the last ``####``, else inside the last ``\\boxed{}``, else the last number of
the response; compared numerically (``"1,000"``, ``"$1000.00"`` and ``"1000"`` are equal).

MATH-500: the content of the last ``\\boxed{}`` (``\\fbox{}`` too), else the Minerva-style ``The final
answer is X``; compared with the gold answer by ``math-verify`` (symbolic and numeric equivalence:
``\\frac{1}{2}`` = ``0.5``, ``\\left( 3, \\frac{\\pi}{2} \\right)`` = ``(3,\\pi/2)``, ...).
"""

from __future__ import annotations

import math
import re
import threading
from fractions import Fraction

_BOX_CMDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced), or of ``\\boxed X``; None if absent."""
    best = -1
    for cmd in _BOX_CMDS:
        best = max(best, text.rfind(cmd))
    if best < 0:
        return None
    rest = text[best:]
    rest = rest[len("\\fbox") :] if rest.startswith("\\fbox") else rest[len("\\boxed") :]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        if rest[:1] == " ":  # "\boxed 5" form: up to the next $ or end of line
            return re.split(r"[$\n]", stripped, maxsplit=1)[0].strip() or None
        return None
    depth = 0
    for i, ch in enumerate(stripped):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return stripped[1:i].strip()
    return None  # unbalanced


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")


def _clean_math_text(text: str) -> str:
    text = _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", text)
    for junk in ("\\$", "$", "\\!", "\\,", "\\;", "\\%", "%", "\\left", "\\right"):
        text = text.replace(junk, " " if junk in ("\\,", "\\;") else "")
    return text


def parse_number(text: str) -> Fraction | None:
    """A number written as ``-1,234.5``, ``$12``, ``3/4``, ``\\frac{3}{4}``; None if ``text`` holds no number."""
    text = _clean_math_text(text)
    m = re.search(r"(-?[\d,]*\.?\d+)\s*/\s*(-?[\d,]*\.?\d+)", text)
    try:
        if m and m.group(0).strip() == text.strip():
            den = Fraction(m.group(2).replace(",", ""))
            return Fraction(m.group(1).replace(",", "")) / den if den else None
        nums = _NUMBER.findall(text)
        return Fraction(nums[-1].replace(",", "")) if nums else None
    except (ValueError, ZeroDivisionError):
        return None


def extract_gsm8k(response: str) -> str | None:
    """The final answer of a GSM8K response: ``#### X``, else ``\\boxed{X}``, else the last number."""
    if "####" in response:
        tail = response.rsplit("####", 1)[1]
        nums = _NUMBER.findall(_clean_math_text(tail.split("\n\n")[0]))
        if nums:
            return nums[0].replace(",", "")
    boxed = last_boxed(response)
    if boxed is not None:
        num = parse_number(boxed)
        if num is not None:
            return _format(num)
    nums = _NUMBER.findall(_clean_math_text(response))
    return nums[-1].replace(",", "") if nums else None


def _format(num: Fraction) -> str:
    if num.denominator == 1:
        return str(num.numerator)
    as_float = float(num)
    return repr(as_float) if Fraction(as_float) == num else f"{num.numerator}/{num.denominator}"


def gsm8k_equal(predicted: str | None, gold: str) -> bool:
    """Numeric equality of a predicted answer and the gold one (relative tolerance 1e-9)."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(gold)
    if a is None or b is None:
        return False
    return a == b or math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


_FINAL_ANSWER = re.compile(r"final answer is\s*:?\s*(.+?)(?:\.\s*I hope it is correct|\n|$)", re.I | re.S)


def extract_math(response: str) -> str | None:
    """The final answer of a MATH response: last ``\\boxed{}``, else ``The final answer is X`` (Minerva format)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    matches = _FINAL_ANSWER.findall(response)
    if matches:
        ans = matches[-1].strip().rstrip(".").strip()
        if ans.startswith("$") and ans.endswith("$") and len(ans) > 1:
            ans = ans.strip("$").strip()
        return ans or None
    return None


def _norm_latex(s: str) -> str:
    return re.sub(r"\s+", "", s).replace("\\!", "").replace("\\left", "").replace("\\right", "")


def math_equal(predicted: str | None, gold: str) -> bool:
    """Whether ``predicted`` is mathematically equivalent to ``gold`` (math-verify; identical LaTeX counts too)."""
    if predicted is None:
        return False
    if _norm_latex(predicted) == _norm_latex(gold):
        return True
    from math_verify import LatexExtractionConfig, parse, verify

    # math-verify's timeouts use SIGALRM, which only works in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig()]
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=config, parsing_timeout=timeout)
        pred_parsed = parse(f"\\boxed{{{predicted}}}", extraction_config=config, parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify raises on pathological input; that answer is simply not equivalent
        return False
