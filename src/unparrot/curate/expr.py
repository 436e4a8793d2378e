"""Recipe expressions: a small grammar, parsed and type-checked before any work, evaluated on columns.

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum (("==" | "!=" | "<" | "<=" | ">" | ">=") sum)?
    sum     := term (("+" | "-") term)*
    term    := unary (("*" | "/") unary)*
    unary   := "-" unary | primary
    primary := NUMBER | STRING | true | false | null | NAME | NAME "." NAME | NAME "(" args ")" | "(" expr ")"

Functions: top(col, fraction) / bottom(col, fraction) -> bool (row in the global top/bottom fraction of a
numeric column, DataComp style), abs(x), len(col) (list or string length), is_null(col).
Nothing is ever passed to Python's eval: the parser builds a tree of tuples that `evaluate` walks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

TOKEN = re.compile(
    r"""\s*(?:(?P<num>\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
    |(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    |(?P<op>==|!=|<=|>=|<|>|\(|\)|,|\.|\+|-|\*|/)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*))""",
    re.X,
)
KEYWORDS = {"and", "or", "not", "true", "false", "null", "True", "False", "None"}
FUNCTIONS = {"top": 2, "bottom": 2, "abs": 1, "len": 1, "is_null": 1}


class ExprError(ValueError):
    """A malformed expression, unknown column or type mismatch, with the expression and position."""


@dataclass
class Token:
    kind: str
    value: str
    pos: int


def tokenize(text: str) -> list[Token]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExprError(f"unexpected character {text[pos:].lstrip()[:1]!r} at position {pos} in {text!r}")
        kind = m.lastgroup
        out.append(Token(kind, m.group(kind), m.start(kind)))
        pos = m.end()
    out.append(Token("end", "", len(text)))
    return out


ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


def unescape(body: str, pos: int, text: str) -> str:
    """A string literal's text: only \\\\, \\", \\', \\n and \\t are escapes, every other character stands for
    itself (not Python's unicode_escape, which reads UTF-8 text as Latin-1: "café" would never match)."""
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1 : i + 2]
            if nxt not in ESCAPES:
                raise ExprError(
                    f"unknown escape \\{nxt} at position {pos + 1 + i} in {text!r} (escapes: \\\\ \\\" \\' \\n \\t)"
                )
            out.append(ESCAPES[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


class Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, tokenize(text), 0

    def peek(self, value=None, kind=None) -> bool:
        t = self.toks[self.i]
        return (value is None or t.value == value) and (kind is None or t.kind == kind)

    def take(self, value=None, kind=None) -> Token:
        t = self.toks[self.i]
        if not self.peek(value, kind):
            want = repr(value) if value else kind
            got = repr(t.value) if t.kind != "end" else "the end"
            raise ExprError(f"expected {want} at position {t.pos} but found {got} in {self.text!r}")
        self.i += 1
        return t

    def parse(self):
        if self.peek(kind="end"):
            raise ExprError("empty expression")
        node = self.or_()
        self.take(kind="end")
        return node

    def or_(self):
        node = self.and_()
        while self.peek("or", "name"):
            self.take()
            node = ("or", node, self.and_())
        return node

    def and_(self):
        node = self.not_()
        while self.peek("and", "name"):
            self.take()
            node = ("and", node, self.not_())
        return node

    def not_(self):
        if self.peek("not", "name"):
            self.take()
            return ("not", self.not_())
        return self.compare()

    def compare(self):
        node = self.sum()
        t = self.toks[self.i]
        if t.kind == "op" and t.value in ("==", "!=", "<", "<=", ">", ">="):
            self.take()
            node = ("cmp", t.value, node, self.sum())
            nxt = self.toks[self.i]
            if nxt.kind == "op" and nxt.value in ("==", "!=", "<", "<=", ">", ">="):
                raise ExprError(f"chained comparison at position {nxt.pos} in {self.text!r}: use 'and'")
        return node

    def sum(self):
        node = self.term()
        while self.peek(kind="op") and self.toks[self.i].value in ("+", "-"):
            op = self.take().value
            node = ("arith", op, node, self.term())
        return node

    def term(self):
        node = self.unary()
        while self.peek(kind="op") and self.toks[self.i].value in ("*", "/"):
            op = self.take().value
            node = ("arith", op, node, self.unary())
        return node

    def unary(self):
        if self.peek("-", "op"):
            self.take()
            return ("neg", self.unary())
        return self.primary()

    def primary(self):
        t = self.toks[self.i]
        if t.kind == "num":
            self.take()
            return ("lit", float(t.value), "num")
        if t.kind == "str":
            self.take()
            return ("lit", unescape(t.value[1:-1], t.pos, self.text), "str")
        if t.kind == "op" and t.value == "(":
            self.take()
            node = self.or_()
            self.take(")")
            return node
        if t.kind == "name":
            self.take()
            if t.value in ("true", "True"):
                return ("lit", True, "bool")
            if t.value in ("false", "False"):
                return ("lit", False, "bool")
            if t.value in ("null", "None"):
                return ("lit", None, "null")
            if t.value in KEYWORDS:
                raise ExprError(f"unexpected {t.value!r} at position {t.pos} in {self.text!r}")
            if self.peek("(", "op"):
                return self.call(t)
            if self.peek(".", "op"):
                self.take()
                col = self.take(kind="name")
                return ("col", f"{t.value}.{col.value}")
            return ("col", t.value)
        got = repr(t.value) if t.kind != "end" else "the end"
        raise ExprError(f"unexpected {got} at position {t.pos} in {self.text!r}")

    def call(self, name: Token):
        if name.value not in FUNCTIONS:
            raise ExprError(f"unknown function {name.value!r} at position {name.pos} (known: {', '.join(FUNCTIONS)})")
        self.take("(")
        args = [self.or_()]
        while self.peek(",", "op"):
            self.take()
            args.append(self.or_())
        self.take(")")
        if len(args) != FUNCTIONS[name.value]:
            raise ExprError(f"{name.value}() takes {FUNCTIONS[name.value]} argument(s), got {len(args)}")
        return ("call", name.value, args)


def parse(text: str):
    if not isinstance(text, str):
        raise ExprError(f"an expression must be a string, got {type(text).__name__}: {text!r}")
    try:
        return Parser(text).parse()
    except RecursionError:  # the parser recurses per parenthesis / unary minus: say so, as an ExprError
        raise ExprError(f"expression nested too deeply ({len(text)} characters): {text[:60]!r}...") from None


def columns_of(node) -> set[str]:
    if node[0] == "col":
        return {node[1]}
    kids = []
    if node[0] in ("and", "or"):
        kids = [node[1], node[2]]
    elif node[0] in ("not", "neg"):
        kids = [node[1]]
    elif node[0] in ("cmp", "arith"):
        kids = [node[2], node[3]]
    elif node[0] == "call":
        kids = node[2]
    return set().union(*(columns_of(k) for k in kids)) if kids else set()


def check(node, types: dict[str, str], text: str = "") -> str:
    """Type of `node` given column types ("num", "bool", "str", "list"); raises ExprError on mismatch."""
    where = f" in {text!r}" if text else ""
    kind = node[0]
    if kind == "lit":
        return node[2]
    if kind == "col":
        if node[1] not in types:
            avail = sorted(c for c, t in types.items() if "." not in c and not t.startswith("ambiguous"))
            raise ExprError(f"unknown column {node[1]!r}{where}; available: {', '.join(avail)}")
        if types[node[1]].startswith("ambiguous:"):
            stages = types[node[1]].split(":", 1)[1].split(",")
            raise ExprError(
                f"column {node[1]!r}{where} is in stages {', '.join(stages)}: write "
                f"{' or '.join(f'{st}.{node[1]}' for st in stages)}"
            )
        return types[node[1]]
    if kind in ("and", "or"):
        for side in (node[1], node[2]):
            t = check(side, types, text)
            if t != "bool":
                raise ExprError(f"'{kind}' needs true/false conditions, got a {t} ({_show(side)}){where}")
        return "bool"
    if kind == "not":
        t = check(node[1], types, text)
        if t != "bool":
            raise ExprError(f"'not' needs a true/false condition, got a {t} ({_show(node[1])}){where}")
        return "bool"
    if kind == "neg":
        if check(node[1], types, text) != "num":
            raise ExprError(f"'-' needs a number{where}")
        return "num"
    if kind == "arith":
        a, b = check(node[2], types, text), check(node[3], types, text)
        if a != "num" or b != "num":
            raise ExprError(f"'{node[1]}' needs numbers, got {a} and {b}{where}")
        return "num"
    if kind == "cmp":
        a, b = check(node[2], types, text), check(node[3], types, text)
        if "null" in (a, b):
            if node[1] not in ("==", "!="):
                raise ExprError(f"null can only be compared with == or !={where}")
            return "bool"
        if a != b:
            raise ExprError(f"cannot compare {_show(node[2])} ({a}) with {_show(node[3])} ({b}){where}")
        if a in ("bool", "list") and node[1] not in ("==", "!="):
            raise ExprError(f"'{node[1]}' does not apply to {a} values{where}")
        if a == "list":
            raise ExprError(f"lists cannot be compared; use len(...){where}")
        return "bool"
    if kind == "call":
        name, args = node[1], node[2]
        ts = [check(a, types, text) for a in args]
        if name in ("top", "bottom"):
            if args[0][0] != "col" or ts[0] != "num":
                raise ExprError(f"{name}() needs a numeric column first{where}")
            if args[1][0] != "lit" or ts[1] != "num" or not 0 < args[1][1] <= 1:
                raise ExprError(f"{name}() needs a fraction in (0, 1] second{where}")
            return "bool"
        if name == "abs":
            if ts[0] != "num":
                raise ExprError(f"abs() needs a number{where}")
            return "num"
        if name == "len":
            if ts[0] not in ("list", "str"):
                raise ExprError(f"len() needs a list or text column{where}")
            return "num"
        if name == "is_null":
            return "bool"
    raise ExprError(f"cannot type {kind}{where}")  # pragma: no cover


def _show(node) -> str:
    if node[0] == "col":
        return node[1]
    if node[0] == "lit":
        return repr(node[1])
    return node[0]


def evaluate(node, cols: dict[str, np.ndarray], n: int):
    """Vectorised value of `node` over n rows. Missing values (None/NaN) make comparisons false."""
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "col":
        return cols[node[1]]
    if kind == "and":
        return _bool(evaluate(node[1], cols, n), n) & _bool(evaluate(node[2], cols, n), n)
    if kind == "or":
        return _bool(evaluate(node[1], cols, n), n) | _bool(evaluate(node[2], cols, n), n)
    if kind == "not":
        return ~_bool(evaluate(node[1], cols, n), n)
    if kind == "neg":
        return -_num(evaluate(node[1], cols, n))
    if kind == "arith":
        a, b = _num(evaluate(node[2], cols, n)), _num(evaluate(node[3], cols, n))
        with np.errstate(divide="ignore", invalid="ignore"):
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[node[1]]
    if kind == "cmp":
        op, a, b = node[1], evaluate(node[2], cols, n), evaluate(node[3], cols, n)
        if a is None or b is None:
            other = b if a is None else a
            isnull = _isnull(other, n)
            return isnull if op == "==" else ~isnull
        return _compare(op, a, b, n)
    if kind == "call":
        name, args = node[1], node[2]
        if name in ("top", "bottom"):
            v = _num(evaluate(args[0], cols, n))
            return rank_mask(v, args[1][1], highest=name == "top")
        if name == "abs":
            return np.abs(_num(evaluate(args[0], cols, n)))
        if name == "len":
            v = evaluate(args[0], cols, n)
            return np.array([np.nan if x is None else len(x) for x in v], float)
        if name == "is_null":
            return _isnull(evaluate(args[0], cols, n), n)
    raise ExprError(f"cannot evaluate {kind}")  # pragma: no cover


def rank_mask(values: np.ndarray, fraction: float, highest: bool = True) -> np.ndarray:
    """The rows in the top (or bottom) `fraction` of all rows by value; missing values never qualify.

    The count is round(fraction * number of rows), ties broken by row order (stable), like DataComp's
    percentile filters applied to the whole pool.
    """
    v = np.asarray(values, float)
    m = int(round(fraction * len(v)))
    valid = ~np.isnan(v)
    key = np.where(valid, -v if highest else v, np.inf)
    order = np.argsort(key, kind="stable")[:m]
    out = np.zeros(len(v), bool)
    out[order] = True
    return out & valid


def _isnull(v, n):
    if not isinstance(v, np.ndarray):
        return np.full(n, v is None)
    if v.dtype == object:
        return np.array([x is None or (isinstance(x, float) and x != x) for x in v])
    return np.isnan(v) if v.dtype.kind == "f" else np.zeros(n, bool)


def _num(v):
    if isinstance(v, np.ndarray):
        return v.astype(float) if v.dtype != object else np.array([np.nan if x is None else float(x) for x in v])
    return float(v)


def _bool(v, n):
    if isinstance(v, np.ndarray):
        if v.dtype == bool:
            return v
        if v.dtype == object:
            return np.array([bool(x) if x is not None and x == x else False for x in v])
        return np.nan_to_num(v.astype(float), nan=0.0) != 0
    return np.full(n, bool(v))


def _compare(op, a, b, n):
    def arr(x):
        return x if isinstance(x, np.ndarray) else np.full(n, x, dtype=object if isinstance(x, str) else None)

    a, b = arr(a), arr(b)
    if a.dtype == object or b.dtype == object:
        out = np.zeros(n, bool)
        for i in range(n):
            x, y = a[i], b[i]
            if x is None or y is None or (isinstance(x, float) and x != x) or (isinstance(y, float) and y != y):
                continue
            out[i] = {"==": x == y, "!=": x != y, "<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[op]
        return out
    with np.errstate(invalid="ignore"):
        res = {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        res &= ~(np.isnan(a.astype(float)) | np.isnan(b.astype(float)))
    return res
