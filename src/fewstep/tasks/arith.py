"""The embedded task ``arith``: evaluate a small +/- expression step by step, in any valid order.

A prompt is an integer expression such as ``9 - ( 3 + 4 ) + 6 ?``. The answer reduces it one
operation at a time, each step an equation ``a op b = c``, steps separated by ``,``, then the final
value after ``####``::

    3 + 4 = 7 , 9 - 7 = 2 , 2 + 6 = 8 #### 8

Several answers are correct for one prompt, and that is the point of the task: the operands of ``+``
may be written in either order (``4 + 3 = 7``), and independent sub-expressions may be reduced in any
order (for ``( 1 + 2 ) - ( 3 - 1 )`` either bracket first). The training data samples one valid
derivation per example, so the model's per-position distributions are multimodal and the tokens of
one step depend on each other: decoding many positions in one forward pass can mix two derivations
(``4 + 4 = 7``), which is the failure few-step decoders must avoid. See docs/embedded.md for the
measured effect and why the knobs have the values they have.

The verifier (:func:`verify`) accepts exactly the valid derivations: every equation must be true,
must reduce a sub-expression whose operands are already numbers (``-`` keeps its order), every
operation must be reduced exactly once, and the final value must be the expression's value.

Train and test problems never overlap: a problem's split is a fixed function of its prompt text
(a hash), so any seed and any size give disjoint splits.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

NAME = "arith"
FINAL = "####"
SEP = ","
OPS = ("+", "-")
COMMUTATIVE = {"+"}

# An expression tree: an int leaf, or (op, left, right).
Expr = int | tuple


@dataclass(frozen=True)
class ArithConfig:
    """Knobs of the problem distribution. The defaults are the shipped task (docs/embedded.md)."""

    shape: str = "chain"  # "chain": left to right, no brackets; "tree": random bracketing
    # 4 to 10 numbers (3 to 9 steps): answers of 19 to 55 tokens, so the end of text lands in the 3rd to
    # the 7th block of 8 of the 64-token canvas (docs/embedded.md section 4 measures the choice).
    min_leaves: int = 4
    max_leaves: int = 10
    max_leaf: int = 9  # leaves are 1..max_leaf
    max_value: int = 20  # every intermediate value lies in 0..max_value
    p_swap: float = 0.5  # probability that a '+' step writes its operands swapped
    p_shuffle: float = 1.0  # probability that a step reduces a random ready node (else the leftmost)
    test_permille: int = 100  # share of the problem space reserved for the test split (by prompt hash)

    def __post_init__(self) -> None:
        if self.shape not in ("chain", "tree"):
            raise ValueError(f"shape must be 'chain' or 'tree', got {self.shape!r}")
        if not 2 <= self.min_leaves <= self.max_leaves:
            raise ValueError("need 2 <= min_leaves <= max_leaves")
        if not 1 <= self.max_leaf <= self.max_value:
            raise ValueError("need 1 <= max_leaf <= max_value")
        for name in ("p_swap", "p_shuffle"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        if not 0 < self.test_permille < 1000:
            raise ValueError("test_permille must lie in (0, 1000)")

    def vocabulary(self) -> list[str]:
        """Every word the task can produce (prompts and answers), for building the tokenizer."""
        return [str(v) for v in range(self.max_value + 1)] + [*OPS, "(", ")", "=", SEP, FINAL, "?"]


@dataclass(frozen=True)
class Problem:
    """One example: ``response`` is one valid derivation (sampled), ``gold`` the final value."""

    id: str
    prompt: str
    response: str
    gold: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "prompt": self.prompt, "response": self.response, "gold": self.gold}


@dataclass(frozen=True)
class Verdict:
    """The verifier's answer: ``correct``, a one-line ``reason`` and the extracted final ``answer``."""

    correct: bool
    reason: str
    answer: str | None = None

    def __bool__(self) -> bool:
        return self.correct


# -- expressions ------------------------------------------------------------------------------------
def evaluate(e: Expr) -> int:
    """The value of an expression tree."""
    if isinstance(e, int):
        return e
    op, a, b = e
    return evaluate(a) + evaluate(b) if op == "+" else evaluate(a) - evaluate(b)


def render(e: Expr, right: bool = False) -> str:
    """Infix text with the fewest brackets: ``+``/``-`` associate left, so only a compound right operand needs them."""
    if isinstance(e, int):
        return str(e)
    op, a, b = e
    text = f"{render(a)} {op} {render(b, right=True)}"
    return f"( {text} )" if right else text


def parse(text: str) -> Expr:
    """Parse a prompt (``9 - ( 3 + 4 ) + 6 ?``) into a tree; ValueError if it is not a valid expression."""
    toks = text.replace("?", " ").split()
    pos = 0

    def atom() -> Expr:
        nonlocal pos
        if pos >= len(toks):
            raise ValueError("expression ends early")
        t = toks[pos]
        pos += 1
        if t == "(":
            e = expr()
            if pos >= len(toks) or toks[pos] != ")":
                raise ValueError("missing ')'")
            pos += 1
            return e
        if not t.isdigit():
            raise ValueError(f"unexpected token {t!r}")
        return int(t)

    def expr() -> Expr:
        nonlocal pos
        e = atom()
        while pos < len(toks) and toks[pos] in OPS:
            op = toks[pos]
            pos += 1
            e = (op, e, atom())
        return e

    tree = expr()
    if pos != len(toks):
        raise ValueError(f"unexpected token {toks[pos]!r}")
    return tree


def _values(e: Expr) -> list[int]:
    if isinstance(e, int):
        return [e]
    return [*_values(e[1]), *_values(e[2]), evaluate(e)]


def _n_ops(e: Expr) -> int:
    return 0 if isinstance(e, int) else 1 + _n_ops(e[1]) + _n_ops(e[2])


def _ready(e: Expr, path: tuple = ()) -> list[tuple]:
    """Paths (tuples of 1/2 child indices) of the operations whose operands are both numbers, left to right."""
    if isinstance(e, int):
        return []
    if isinstance(e[1], int) and isinstance(e[2], int):
        return [path]
    return _ready(e[1], (*path, 1)) + _ready(e[2], (*path, 2))


def _get(e: Expr, path: tuple) -> Expr:
    for i in path:
        e = e[i]
    return e


def _replace(e: Expr, path: tuple, value: int) -> Expr:
    if not path:
        return value
    parts = list(e)
    parts[path[0]] = _replace(e[path[0]], path[1:], value)
    return tuple(parts)


# -- generation -------------------------------------------------------------------------------------
def _random_tree(rng: random.Random, n_leaves: int, cfg: ArithConfig) -> Expr:
    if cfg.shape == "chain":
        e: Expr = rng.randint(1, cfg.max_leaf)
        for _ in range(n_leaves - 1):
            e = (rng.choice(OPS), e, rng.randint(1, cfg.max_leaf))
        return e
    if n_leaves == 1:
        return rng.randint(1, cfg.max_leaf)
    k = rng.randint(1, n_leaves - 1)
    return (rng.choice(OPS), _random_tree(rng, k, cfg), _random_tree(rng, n_leaves - k, cfg))


def random_expression(rng: random.Random, cfg: ArithConfig) -> Expr:
    """A random tree whose intermediate values all lie in ``0..max_value`` (rejection sampling)."""
    n = rng.randint(cfg.min_leaves, cfg.max_leaves)
    while True:
        e = _random_tree(rng, n, cfg)
        if all(0 <= v <= cfg.max_value for v in _values(e)):
            return e


def derivation(e: Expr, rng: random.Random, cfg: ArithConfig) -> str:
    """One valid answer for ``e``: random ready node (w.p. ``p_shuffle``), '+' operands swapped w.p. ``p_swap``."""
    steps = []
    while not isinstance(e, int):
        ready = _ready(e)
        path = rng.choice(ready) if rng.random() < cfg.p_shuffle else ready[0]
        op, a, b = _get(e, path)
        c = a + b if op == "+" else a - b
        if op in COMMUTATIVE and rng.random() < cfg.p_swap:
            a, b = b, a
        steps.append(f"{a} {op} {b} = {c}")
        e = _replace(e, path, c)
    return f" {SEP} ".join(steps) + f" {FINAL} {e}"


def split_of(prompt: str, cfg: ArithConfig = ArithConfig()) -> str:
    """``"test"`` or ``"train"``: a fixed function of the prompt text, so splits never overlap."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "test" if h % 1000 < cfg.test_permille else "train"


def generate_problems(
    split: str, n: int, seed: int = 0, cfg: ArithConfig = ArithConfig(), unique: bool = True
) -> list[Problem]:
    """``n`` problems of ``split`` (``"train"`` or ``"test"``), deterministic for ``(split, n, seed, cfg)``.

    ``unique`` keeps each prompt once (the test split always does). Train prompts may otherwise repeat
    with different sampled derivations.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(f"{NAME}:{split}:{seed}")
    seen: set[str] = set()
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 10_000:
            raise ValueError(f"could not find {n} distinct {split} problems with {cfg}; ask for fewer")
        e = random_expression(rng, cfg)
        prompt = render(e) + " ?"
        if split_of(prompt, cfg) != split or ((unique or split == "test") and prompt in seen):
            continue
        seen.add(prompt)
        out.append(Problem(f"{NAME}-{split}-{len(out):06d}", prompt, derivation(e, rng, cfg), str(evaluate(e))))
    return out


# -- verification -----------------------------------------------------------------------------------
_SPECIAL = re.compile(r"<\|[^|]*\|>|<unk>|\[UNK\]")
_EQUATION = re.compile(r"^(\d+) ([+-]) (\d+) = (-?\d+)$")


#: Old name of :func:`generate_problems` (renamed: ``fewstep.generate`` is the decoder).
generate = generate_problems


def extract_answer(response: str) -> str | None:
    """The final value after ``####`` (text after the first special token such as EOS is ignored)."""
    text = _SPECIAL.split(response, maxsplit=1)[0]
    if FINAL not in text:
        return None
    tail = text.rsplit(FINAL, 1)[1].split()
    return tail[0] if tail else None


def verify(prompt: str, response: str) -> Verdict:
    """Is ``response`` a valid step-by-step derivation of ``prompt``'s value? With the reason if not.

    Text after the first special token (``<|endoftext|>``, a mask, ...) is ignored, so a decoded
    canvas can be passed as is. Any valid order of the steps and either operand order of ``+`` is
    accepted; anything else (a false equation, a step that does not reduce a ready sub-expression, a
    missing step, a wrong or missing final value, trailing words) is wrong.
    """
    try:
        tree = parse(prompt)
    except ValueError as exc:
        return Verdict(False, f"prompt is not an arith expression: {exc}")
    text = " ".join(_SPECIAL.split(response, maxsplit=1)[0].split())
    answer = extract_answer(text)
    if FINAL not in text:
        return Verdict(False, f"no final answer ('{FINAL}' missing)")
    body, _, tail = text.rpartition(FINAL)
    tail_words = tail.split()
    if not tail_words:
        return Verdict(False, f"nothing after '{FINAL}'", None)
    if len(tail_words) > 1:
        return Verdict(False, f"trailing text after the final answer: {' '.join(tail_words[1:])!r}", answer)
    steps = [s.strip() for s in body.split(SEP)] if body.strip() else []
    parsed = []
    for i, s in enumerate(steps, 1):
        m = _EQUATION.match(s)
        if not m:
            return Verdict(False, f"step {i} is not an equation 'a op b = c': {s!r}", answer)
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if (a + b if op == "+" else a - b) != c:
            return Verdict(False, f"step {i} is false: {s}", answer)
        parsed.append((a, op, b, c))
    n_ops = _n_ops(tree)
    if len(parsed) != n_ops:
        return Verdict(False, f"{len(parsed)} steps for {n_ops} operations", answer)
    if not _derives(tree, parsed):
        bad = _first_unmatched(tree, parsed)
        return Verdict(False, f"step {bad} does not reduce a ready sub-expression", answer)
    value = str(evaluate(tree))
    if answer != value:
        return Verdict(False, f"final answer {answer} but the steps give {value}", answer)
    return Verdict(True, "ok", answer)


def _matches(node: tuple, step: tuple) -> bool:
    op, a, b = node
    sa, sop, sb, _ = step
    return sop == op and ((sa, sb) == (a, b) or (op in COMMUTATIVE and (sa, sb) == (b, a)))


def _derives(tree: Expr, steps: list[tuple]) -> bool:
    """True if the steps reduce ``tree`` in order (backtracking over identical ready sub-expressions)."""
    if not steps:
        return isinstance(tree, int)
    for path in _ready(tree):
        if _matches(_get(tree, path), steps[0]) and _derives(_replace(tree, path, steps[0][3]), steps[1:]):
            return True
    return False


def _first_unmatched(tree: Expr, steps: list[tuple]) -> int:
    """1-based index of the first step that no ready sub-expression matches (greedy, for the reason text)."""
    for i, step in enumerate(steps, 1):
        for path in _ready(tree):
            if _matches(_get(tree, path), step):
                tree = _replace(tree, path, step[3])
                break
        else:
            return i
    return len(steps)


def n_derivations(e: Expr) -> int:
    """How many distinct valid answers ``e`` has (orders times operand orders); used in docs and tests."""
    if isinstance(e, int):
        return 1
    total = 0
    for path in _ready(e):
        op, a, b = _get(e, path)
        total += (2 if op in COMMUTATIVE and a != b else 1) * n_derivations(_replace(e, path, evaluate((op, a, b))))
    return total
