"""Calico's label-selector language: parser, canonical form and a fast evaluator (pure, no I/O).

The accepted language, the canonical text and the unique ID are those of Calico's
``libcalico-go/lib/selector`` (tokenizer, parser and AST), so a selector has the same identity here
as in Felix (IP-set names are derived from :meth:`Selector.unique_id`).

Grammar (``!`` binds tighter than ``&&``, which binds tighter than ``||``)::

    selector  := <empty> | or_expr
    or_expr   := and_expr ( "||" and_expr )*
    and_expr  := operation ( "&&" operation )*
    operation := "!"* ( "(" or_expr ")" | "all()" | "global()" | "has(" label ")"
                       | label ( "==" | "!=" | "contains" | "starts with" | "ends with" ) string
                       | label ( "in" | "not in" ) "{" [ string ( "," string )* [","] ] "}" )
    label     := [A-Za-z0-9_./-]{1,512}
    string    := '"' <anything but "> '"'  |  "'" <anything but '> "'"

Whitespace is space or tab only (as in Calico). Semantics worth knowing:

* ``k != 'v'`` and ``k not in {...}`` also match objects that lack the label ``k``.
* ``contains``/``starts with``/``ends with`` never match a missing label.
* ``global()`` evaluates to true (it is only meaningful as a namespaceSelector marker).
* An empty selector means ``all()``.

The canonical text (:attr:`Selector.text`) is Calico's ``String()``, byte for byte, because IP-set and
chain names hash it. Like Calico's, it is not always a fixed point: ``!(!x)`` renders as ``!!x``, which
re-parses to ``x``.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import functools
import hashlib
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Final, cast

__all__ = [
    "ALL",
    "MAX_LABEL_LENGTH",
    "MAX_NESTING",
    "LabelRestriction",
    "Selector",
    "SelectorError",
    "parse_selector",
]

Labels = Mapping[str, str]
Matcher = Callable[[Labels], bool]

MAX_LABEL_LENGTH: Final = 512  # Calico's tokenizer.MaxLabelLength
# Calico has no limit, but a Python recursive-descent parser must have one; no real selector comes close.
MAX_NESTING: Final = 100


class SelectorError(ValueError):
    """A selector that Calico also rejects (or one nested deeper than :data:`MAX_NESTING`).

    ``position`` is the 0-based character offset of the problem in ``selector``.
    """

    def __init__(self, selector: str, position: int, reason: str) -> None:
        self.selector = selector
        self.position = position
        self.reason = reason
        super().__init__(f"invalid selector (position {position}): {reason}: {_excerpt(selector, position)}")


def _excerpt(text: str, pos: int, width: int = 40) -> str:
    """The text around ``pos`` with a ``>>>`` marker, kept to one line for logs."""
    before = text[max(0, pos - width) : pos]
    after = text[pos : pos + width]
    lead = "..." if pos > width else ""
    tail = "..." if pos + width < len(text) else ""
    return f"{lead}{before}>>>{after}{tail}".encode("unicode_escape").decode("ascii")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer

_LABEL, _STRING, _LBRACE, _RBRACE, _COMMA, _EQ, _NE, _IN, _NOT, _NOT_IN = range(10)
_CONTAINS, _STARTS_WITH, _ENDS_WITH, _ALL, _HAS, _LPAREN, _RPAREN, _AND, _OR, _GLOBAL, _EOF = range(10, 21)

_TOKEN_DESCRIPTIONS: Final = {
    _LABEL: "label",
    _STRING: "string",
    _LBRACE: "'{'",
    _RBRACE: "'}'",
    _COMMA: "','",
    _EQ: "'=='",
    _NE: "'!='",
    _IN: "'in'",
    _NOT: "'!'",
    _NOT_IN: "'not in'",
    _CONTAINS: "'contains'",
    _STARTS_WITH: "'starts with'",
    _ENDS_WITH: "'ends with'",
    _ALL: "'all()'",
    _HAS: "'has()'",
    _LPAREN: "'('",
    _RPAREN: "')'",
    _AND: "'&&'",
    _OR: "'||'",
    _GLOBAL: "'global()'",
    _EOF: "end of selector",
}

_SIMPLE_TOKENS: Final = {"(": _LPAREN, ")": _RPAREN, "{": _LBRACE, "}": _RBRACE, ",": _COMMA}
_IDENT_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")
_WHITESPACE: Final = " \t"
# Operators that may follow a label, tried in Calico's order (so "not in" wins over a label named "in").
_LABEL_OPERATORS: Final = (
    (("contains",), _CONTAINS),
    (("starts", "with"), _STARTS_WITH),
    (("ends", "with"), _ENDS_WITH),
    (("not", "in"), _NOT_IN),
    (("in",), _IN),
)

_Token = tuple[int, str, int]  # (kind, value, position)


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WHITESPACE:
        i += 1
    return i


def _cut_identifier(text: str, i: int) -> tuple[str, int]:
    j = i
    n = len(text)
    while j < n and text[j] in _IDENT_CHARS:
        j += 1
    if j == i:
        found = repr(text[i]) if i < n else "end of selector"
        raise SelectorError(text, i, f"expected a label, found {found}")
    if j - i > MAX_LABEL_LENGTH:
        raise SelectorError(text, i, f"label longer than {MAX_LABEL_LENGTH} characters")
    return text[i:j], j


def _at_word_boundary(text: str, i: int) -> bool:
    return i >= len(text) or text[i] not in _IDENT_CHARS


def _cut_words(text: str, i: int, words: tuple[str, ...]) -> int:
    """End offset of the operator ``words`` starting at ``i`` (whitespace between words optional), or -1."""
    j = i
    for n, word in enumerate(words):
        if n:
            j = _skip_ws(text, j)
        if not text.startswith(word, j):
            return -1
        j += len(word)
    # Only the end of the last word must be a word boundary; "notin" and "startswith" are accepted.
    # (Calico also skips whitespace before this check; that only changes which error a bad selector gets.)
    return j if _at_word_boundary(text, j) else -1


def _cut_call(text: str, i: int, name: str) -> int:
    """Offset after ``name()`` with optional inner whitespace, assuming ``name(`` is at ``i``."""
    j = _skip_ws(text, i + len(name) + 1)
    if not text.startswith(")", j):
        raise SelectorError(text, j, f"expected ')' to close {name}(")
    return j + 1


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    n = len(text)
    i = 0
    while True:
        i = _skip_ws(text, i)
        if i >= n:
            tokens.append((_EOF, "", i))
            return tokens
        c = text[i]
        start = i
        simple = _SIMPLE_TOKENS.get(c)
        if simple is not None:
            tokens.append((simple, c, start))
            i += 1
        elif c == '"' or c == "'":
            end = text.find(c, i + 1)
            if end < 0:
                raise SelectorError(text, start, "unterminated string")
            tokens.append((_STRING, text[i + 1 : end], start))
            i = end + 1
        elif c == "=":
            if not text.startswith("==", i):
                raise SelectorError(text, start, "expected '=='")
            tokens.append((_EQ, "==", start))
            i += 2
        elif c == "!":
            if text.startswith("!=", i):
                tokens.append((_NE, "!=", start))
                i += 2
            else:
                tokens.append((_NOT, "!", start))
                i += 1
        elif c == "&":
            if not text.startswith("&&", i):
                raise SelectorError(text, start, "expected '&&'")
            tokens.append((_AND, "&&", start))
            i += 2
        elif c == "|":
            if not text.startswith("||", i):
                raise SelectorError(text, start, "expected '||'")
            tokens.append((_OR, "||", start))
            i += 2
        elif tokens and tokens[-1][0] == _LABEL:
            # Straight after a label only a word operator can follow (symbol operators were handled above).
            for words, kind in _LABEL_OPERATORS:
                end = _cut_words(text, i, words)
                if end >= 0:
                    tokens.append((kind, " ".join(words), start))
                    i = end
                    break
            else:
                raise SelectorError(text, start, f"expected an operator after label {tokens[-1][1]!r}")
        elif text.startswith("has(", i):
            j = _skip_ws(text, i + 4)
            ident, j = _cut_identifier(text, j)
            j = _skip_ws(text, j)
            if not text.startswith(")", j):
                raise SelectorError(text, j, "expected ')' to close has(")
            tokens.append((_HAS, ident, start))
            i = j + 1
        elif text.startswith("all(", i):
            tokens.append((_ALL, "all()", start))
            i = _cut_call(text, i, "all")
        elif text.startswith("global(", i):
            tokens.append((_GLOBAL, "global()", start))
            i = _cut_call(text, i, "global")
        else:
            ident, i = _cut_identifier(text, i)
            tokens.append((_LABEL, ident, start))


# ---------------------------------------------------------------------------------------------------------
# AST. Each node renders Calico's canonical fragments, reports the label keys and restrictions it implies,
# and compiles either to a Python expression (fast path) or to a closure (fallback for deep nesting).


@dataclasses.dataclass(frozen=True, slots=True)
class LabelRestriction:
    """A necessary condition on one label for a selector to match (Calico's ``LabelRestriction``).

    ``one_of`` is None when the value is unrestricted; an empty set means nothing can match.
    """

    must_be_present: bool = False
    must_be_absent: bool = False
    one_of: frozenset[str] | None = None

    def possible_to_satisfy(self) -> bool:
        if self.must_be_present and self.must_be_absent:
            return False
        return self.one_of is None or len(self.one_of) > 0


_Restrictions = dict[str, LabelRestriction]


def _labels() -> ast.Name:
    return ast.Name(id="L", ctx=ast.Load())


def _get(key: str, default: str | None = None) -> ast.Call:
    """``L.get(key)`` or ``L.get(key, default)``."""
    args: list[ast.expr] = [ast.Constant(key)]
    if default is not None:
        args.append(ast.Constant(default))
    return ast.Call(func=ast.Attribute(value=_labels(), attr="get", ctx=ast.Load()), args=args, keywords=[])


def _has(key: str) -> ast.expr:
    return ast.Compare(left=ast.Constant(key), ops=[ast.In()], comparators=[_labels()])


def _compare(left: ast.expr, op: ast.cmpop, right: str | frozenset[str]) -> ast.expr:
    # CPython accepts frozenset constants (its own optimiser makes them for `x in {...}`); typeshed
    # does not list them.
    const = ast.Constant(right)  # type: ignore[arg-type]
    return ast.Compare(left=left, ops=[op], comparators=[const])


def _method(target: ast.expr, name: str, arg: str) -> ast.expr:
    func = ast.Attribute(value=target, attr=name, ctx=ast.Load())
    return ast.Call(func=func, args=[ast.Constant(arg)], keywords=[])


def _quote(value: str) -> str:
    # Calico prefers double quotes; a value containing '"' cannot contain "'" (no escapes exist).
    q = "'" if '"' in value else '"'
    return f"{q}{value}{q}"


class _Node:
    __slots__ = ()

    def render(self, out: list[str]) -> None:
        raise NotImplementedError

    def collect_keys(self, out: set[str]) -> None:
        pass

    def restrictions(self) -> _Restrictions:
        return {}

    def code(self) -> ast.expr:
        """A Python expression over the labels mapping ``L``."""
        raise NotImplementedError

    def closure(self) -> Matcher:
        raise NotImplementedError

    def prefixed(self, prefix: str) -> _Node:
        return self


class _AllNode(_Node):
    __slots__ = ()

    def render(self, out: list[str]) -> None:
        out.append("all()")

    def code(self) -> ast.expr:
        return ast.Constant(True)

    def closure(self) -> Matcher:
        return _always_true


class _GlobalNode(_AllNode):
    __slots__ = ()

    def render(self, out: list[str]) -> None:
        out.append("global()")


def _always_true(labels: Labels) -> bool:
    return True


class _KeyNode(_Node):
    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def collect_keys(self, out: set[str]) -> None:
        out.add(self.key)


class _HasNode(_KeyNode):
    __slots__ = ()

    def render(self, out: list[str]) -> None:
        out.extend(("has(", self.key, ")"))

    def restrictions(self) -> _Restrictions:
        return {self.key: LabelRestriction(must_be_present=True)}

    def code(self) -> ast.expr:
        return _has(self.key)

    def closure(self) -> Matcher:
        key = self.key
        return lambda labels: key in labels

    def prefixed(self, prefix: str) -> _Node:
        return _HasNode(prefix + self.key)


class _ValueNode(_KeyNode):
    """``label <op> "value"``."""

    __slots__ = ("value",)
    op = ""

    def __init__(self, key: str, value: str) -> None:
        self.key = key
        self.value = value

    def render(self, out: list[str]) -> None:
        out.extend((self.key, " ", self.op, " ", _quote(self.value)))

    def restrictions(self) -> _Restrictions:
        return {self.key: LabelRestriction(must_be_present=True)}

    def prefixed(self, prefix: str) -> _Node:
        return type(self)(prefix + self.key, self.value)


class _EqNode(_ValueNode):
    __slots__ = ()
    op = "=="

    def restrictions(self) -> _Restrictions:
        return {self.key: LabelRestriction(must_be_present=True, one_of=frozenset((self.value,)))}

    def code(self) -> ast.expr:
        # Label values are str, so a missing label (None) never compares equal.
        return _compare(_get(self.key), ast.Eq(), self.value)

    def closure(self) -> Matcher:
        key, value = self.key, self.value
        return lambda labels: labels.get(key) == value


class _NeNode(_ValueNode):
    __slots__ = ()
    op = "!="

    def restrictions(self) -> _Restrictions:
        return {}

    def code(self) -> ast.expr:
        return _compare(_get(self.key), ast.NotEq(), self.value)

    def closure(self) -> Matcher:
        key, value = self.key, self.value
        return lambda labels: labels.get(key) != value


class _ContainsNode(_ValueNode):
    __slots__ = ()
    op = "contains"

    def code(self) -> ast.expr:
        if not self.value:  # "" is in every string, so this is has(key)
            return _has(self.key)
        # A missing label reads as "", which cannot contain a non-empty value.
        return ast.Compare(left=ast.Constant(self.value), ops=[ast.In()], comparators=[_get(self.key, "")])

    def closure(self) -> Matcher:
        key, value = self.key, self.value
        if not value:
            return lambda labels: key in labels
        return lambda labels: value in labels.get(key, "")


class _StartsWithNode(_ValueNode):
    __slots__ = ()
    op = "starts with"

    def code(self) -> ast.expr:
        if not self.value:
            return _has(self.key)
        return _method(_get(self.key, ""), "startswith", self.value)

    def closure(self) -> Matcher:
        key, value = self.key, self.value
        if not value:
            return lambda labels: key in labels
        return lambda labels: labels.get(key, "").startswith(value)


class _EndsWithNode(_ValueNode):
    __slots__ = ()
    op = "ends with"

    def code(self) -> ast.expr:
        if not self.value:
            return _has(self.key)
        return _method(_get(self.key, ""), "endswith", self.value)

    def closure(self) -> Matcher:
        key, value = self.key, self.value
        if not value:
            return lambda labels: key in labels
        return lambda labels: labels.get(key, "").endswith(value)


class _SetNode(_KeyNode):
    """``label in {...}`` / ``label not in {...}``; values are kept sorted and de-duplicated as in Calico."""

    __slots__ = ("frozen", "values")
    op = ""

    def __init__(self, key: str, values: Iterable[str]) -> None:
        self.key = key
        self.frozen = frozenset(values)
        # Python's str ordering is by code point, the same order as Go's byte-wise UTF-8 comparison.
        self.values = tuple(sorted(self.frozen))

    def render(self, out: list[str]) -> None:
        out.extend((self.key, " ", self.op, " {", ", ".join(_quote(v) for v in self.values), "}"))

    def prefixed(self, prefix: str) -> _Node:
        return type(self)(prefix + self.key, self.values)


class _InNode(_SetNode):
    __slots__ = ()
    op = "in"

    def restrictions(self) -> _Restrictions:
        return {self.key: LabelRestriction(must_be_present=True, one_of=self.frozen)}

    def code(self) -> ast.expr:
        return _compare(_get(self.key), ast.In(), self.frozen)

    def closure(self) -> Matcher:
        key, values = self.key, self.frozen
        return lambda labels: labels.get(key) in values


class _NotInNode(_SetNode):
    __slots__ = ()
    op = "not in"

    def code(self) -> ast.expr:
        return _compare(_get(self.key), ast.NotIn(), self.frozen)

    def closure(self) -> Matcher:
        key, values = self.key, self.frozen
        return lambda labels: labels.get(key) not in values


class _NotNode(_Node):
    __slots__ = ("operand",)

    def __init__(self, operand: _Node) -> None:
        self.operand = operand

    def render(self, out: list[str]) -> None:
        out.append("!")
        self.operand.render(out)

    def collect_keys(self, out: set[str]) -> None:
        self.operand.collect_keys(out)

    def restrictions(self) -> _Restrictions:
        # Only !has(k) says something definite; !(k == 'v') does not require k to be absent.
        if isinstance(self.operand, _HasNode):
            return {self.operand.key: LabelRestriction(must_be_absent=True)}
        return {}

    def code(self) -> ast.expr:
        return ast.UnaryOp(op=ast.Not(), operand=self.operand.code())

    def closure(self) -> Matcher:
        inner = self.operand.closure()
        return lambda labels: not inner(labels)

    def prefixed(self, prefix: str) -> _Node:
        return _NotNode(self.operand.prefixed(prefix))


class _BoolNode(_Node):
    __slots__ = ("operands",)
    op = ""

    def __init__(self, operands: list[_Node]) -> None:
        self.operands = operands

    def render(self, out: list[str]) -> None:
        out.append("(")
        first = True
        for operand in self.operands:
            if not first:
                out.append(self.op)
            first = False
            operand.render(out)
        out.append(")")

    def collect_keys(self, out: set[str]) -> None:
        for operand in self.operands:
            operand.collect_keys(out)

    def prefixed(self, prefix: str) -> _Node:
        return type(self)([o.prefixed(prefix) for o in self.operands])


class _AndNode(_BoolNode):
    __slots__ = ()
    op = " && "

    def restrictions(self) -> _Restrictions:
        merged: _Restrictions = {}
        for operand in self.operands:
            for key, r in operand.restrictions().items():
                base = merged.get(key)
                if base is None:
                    merged[key] = r
                    continue
                if base.one_of is None:
                    one_of = r.one_of
                elif r.one_of is None:
                    one_of = base.one_of
                else:
                    one_of = base.one_of & r.one_of
                merged[key] = LabelRestriction(
                    must_be_present=base.must_be_present or r.must_be_present,
                    must_be_absent=base.must_be_absent or r.must_be_absent,
                    one_of=one_of,
                )
        return merged

    def code(self) -> ast.expr:
        return ast.BoolOp(op=ast.And(), values=[o.code() for o in self.operands])

    def closure(self) -> Matcher:
        fns = tuple(o.closure() for o in self.operands)
        if len(fns) == 2:
            a, b = fns
            return lambda labels: a(labels) and b(labels)

        def all_of(labels: Labels) -> bool:
            return all(fn(labels) for fn in fns)

        return all_of


class _OrNode(_BoolNode):
    __slots__ = ()
    op = " || "

    def restrictions(self) -> _Restrictions:
        # Only what every alternative requires survives.
        result = dict(self.operands[0].restrictions())
        for operand in self.operands[1:]:
            other = operand.restrictions()
            for key, r in list(result.items()):
                o = other.get(key, LabelRestriction())
                present = r.must_be_present and o.must_be_present
                absent = r.must_be_absent and o.must_be_absent
                one_of: frozenset[str] | None = None
                if present and r.one_of is not None and o.one_of is not None:
                    one_of = r.one_of | o.one_of
                if present or absent:
                    result[key] = LabelRestriction(must_be_present=present, must_be_absent=absent, one_of=one_of)
                else:
                    del result[key]
        return result

    def code(self) -> ast.expr:
        return ast.BoolOp(op=ast.Or(), values=[o.code() for o in self.operands])

    def closure(self) -> Matcher:
        fns = tuple(o.closure() for o in self.operands)
        if len(fns) == 2:
            a, b = fns
            return lambda labels: a(labels) or b(labels)

        def any_of(labels: Labels) -> bool:
            return any(fn(labels) for fn in fns)

        return any_of


# ---------------------------------------------------------------------------------------------------------
# Parser: recursive descent over the token list, mirroring Calico's parser (same accepted language and AST).

_VALUE_OPS: Final[dict[int, type[_ValueNode]]] = {
    _EQ: _EqNode,
    _NE: _NeNode,
    _CONTAINS: _ContainsNode,
    _STARTS_WITH: _StartsWithNode,
    _ENDS_WITH: _EndsWithNode,
}


class _Parser:
    __slots__ = ("depth", "pos", "text", "tokens")

    def __init__(self, text: str, tokens: list[_Token]) -> None:
        self.text = text
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def fail(self, token: _Token, reason: str) -> SelectorError:
        return SelectorError(self.text, token[2], reason)

    def found(self, token: _Token) -> str:
        kind, value, _ = token
        if kind == _LABEL:
            return f"label {value!r}"
        if kind == _STRING:
            return f"string {_quote(value)}"
        return _TOKEN_DESCRIPTIONS[kind]

    def parse(self) -> _Node:
        if self.tokens[0][0] == _EOF:
            return _AllNode()
        node = self.parse_or()
        tok = self.tokens[self.pos]
        if tok[0] != _EOF:
            raise self.fail(tok, f"unexpected {self.found(tok)} after a complete expression")
        return node

    def parse_or(self) -> _Node:
        operands = [self.parse_and()]
        while self.tokens[self.pos][0] == _OR:
            self.pos += 1
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else _OrNode(operands)

    def parse_and(self) -> _Node:
        operands = [self.parse_operation()]
        while self.tokens[self.pos][0] == _AND:
            self.pos += 1
            operands.append(self.parse_operation())
        return operands[0] if len(operands) == 1 else _AndNode(operands)

    def parse_operation(self) -> _Node:
        tokens = self.tokens
        # Any run of "!" collapses to one negation or none, as in Calico (so "!!has(a)" is "has(a)").
        negated = False
        while tokens[self.pos][0] == _NOT:
            negated = not negated
            self.pos += 1
        tok = tokens[self.pos]
        kind = tok[0]
        node: _Node
        if kind == _HAS:
            node = _HasNode(tok[1])
            self.pos += 1
        elif kind == _ALL:
            node = _AllNode()
            self.pos += 1
        elif kind == _GLOBAL:
            node = _GlobalNode()
            self.pos += 1
        elif kind == _LABEL:
            node = self.parse_label_operation(tok)
        elif kind == _LPAREN:
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.fail(tok, f"parentheses nested deeper than {MAX_NESTING} levels")
            self.pos += 1
            node = self.parse_or()
            close = tokens[self.pos]
            if close[0] != _RPAREN:
                raise self.fail(close, f"expected ')' to match '(' at position {tok[2]}, found {self.found(close)}")
            self.pos += 1
            self.depth -= 1
        else:
            raise self.fail(tok, f"expected a label, has(), all(), global(), '!' or '(', found {self.found(tok)}")
        return _NotNode(node) if negated else node

    def parse_label_operation(self, label_tok: _Token) -> _Node:
        tokens = self.tokens
        key = label_tok[1]
        op_tok = tokens[self.pos + 1]
        op = op_tok[0]
        if op == _EOF:
            raise self.fail(op_tok, f"expected an operator after label {key!r}, found end of selector")
        value_tok = tokens[self.pos + 2]
        value_node = _VALUE_OPS.get(op)
        if value_node is not None:
            if value_tok[0] != _STRING:
                raise self.fail(
                    value_tok, f"expected a quoted string after {op_tok[1]!r}, found {self.found(value_tok)}"
                )
            self.pos += 3
            return value_node(key, value_tok[1])
        if op in (_IN, _NOT_IN):
            if value_tok[0] != _LBRACE:
                raise self.fail(
                    value_tok,
                    f"expected '{{' to start a set after {op_tok[1]!r}, found {self.found(value_tok)}",
                )
            i = self.pos + 3
            values: list[str] = []
            # Strings separated by commas; a trailing comma is accepted (as in Calico).
            while tokens[i][0] == _STRING:
                values.append(tokens[i][1])
                i += 1
                if tokens[i][0] != _COMMA:
                    break
                i += 1
            if tokens[i][0] != _RBRACE:
                raise self.fail(tokens[i], f"expected a string, ',' or '}}' in set, found {self.found(tokens[i])}")
            self.pos = i + 1
            return _InNode(key, values) if op == _IN else _NotInNode(key, values)
        raise self.fail(
            op_tok,
            f"expected ==, !=, in, not in, contains, starts with or ends with after label {key!r}, "
            f"found {self.found(op_tok)}",
        )


# ---------------------------------------------------------------------------------------------------------
# Compilation and the public Selector type


def _compile_code(root: _Node) -> Matcher:
    """Compile to one Python function, so evaluation is a single call with no per-node dispatch.

    The function is built as a Python AST, never as source text: label keys and values are constants
    of that AST, so no selector content can become code.
    """
    args = ast.arguments(posonlyargs=[], args=[ast.arg(arg="L")], kwonlyargs=[], kw_defaults=[], defaults=[])
    tree = ast.Expression(body=ast.Lambda(args=args, body=root.code()))
    ast.fix_missing_locations(tree)
    fn = eval(compile(tree, "<selector>", "eval"), {"__builtins__": {}})
    fn.__name__ = fn.__qualname__ = "selector_matches"
    return cast(Matcher, fn)


def _compile(root: _Node) -> Matcher:
    try:
        return _compile_code(root)
    except (SyntaxError, RecursionError, MemoryError):
        # CPython's compiler limits nesting; the closure tree has no such limit below MAX_NESTING.
        return root.closure()


class Selector:
    """A parsed selector. Immutable; equal selectors (same canonical text) compare and hash equal.

    ``matches(labels)`` is the compiled evaluator itself (stored per instance), so a call costs one
    Python function call.
    """

    __slots__ = ("__weakref__", "_keys", "_restrictions", "_root", "_uid", "matches", "text")

    text: str
    matches: Matcher

    def __init__(self, root: _Node, text: str) -> None:
        self._root = root
        self.text = text
        self.matches = _compile(root)
        self._keys: frozenset[str] | None = None
        self._restrictions: Mapping[str, LabelRestriction] | None = None
        self._uid: str | None = None

    def label_keys(self) -> frozenset[str]:
        """Every label key the result can depend on."""
        if self._keys is None:
            keys: set[str] = set()
            self._root.collect_keys(keys)
            self._keys = frozenset(keys)
        return self._keys

    def label_restrictions(self) -> Mapping[str, LabelRestriction]:
        """Necessary conditions per label (for indexing): any labels that match satisfy all of them."""
        if self._restrictions is None:
            self._restrictions = dict(self._root.restrictions())
        return self._restrictions

    def unique_id(self) -> str:
        """Calico's ``UniqueID()``: ``"s:" + base64url(sha224("s:" + text))`` without padding."""
        if self._uid is None:
            digest = hashlib.sha224(b"s:" + self.text.encode()).digest()
            self._uid = "s:" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        return self._uid

    def with_label_prefix(self, prefix: str) -> Selector:
        """The same selector over keys ``prefix + key`` (Calico's PrefixVisitor, e.g. ``pcns.`` for
        namespaceSelectors)."""
        return _intern(self._root.prefixed(prefix))

    def is_all(self) -> bool:
        """True for ``all()`` (and the empty selector)."""
        return self.text == "all()"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Selector):
            return self.text == other.text
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"Selector({self.text!r})"

    def __str__(self) -> str:
        return self.text

    def __reduce__(self) -> tuple[Callable[[_Node], Selector], tuple[_Node]]:
        # Compiled functions do not pickle, so rebuild from the AST (not from the text: "!!x" would
        # re-parse to "x" and change identity).
        return (_intern, (self._root,))


# Equal selectors share one instance (and one compiled function) while anyone holds it.
_by_text: weakref.WeakValueDictionary[str, Selector] = weakref.WeakValueDictionary()


def _intern(root: _Node) -> Selector:
    parts: list[str] = []
    root.render(parts)
    text = "".join(parts)
    sel = _by_text.get(text)
    if sel is None:
        sel = Selector(root, text)
        _by_text[text] = sel
    return sel


@functools.lru_cache(maxsize=65536)
def parse_selector(text: str) -> Selector:
    """Parse a Calico selector; ``""`` (or only whitespace) means ``all()``.

    Results are cached per distinct input string. Raises :class:`SelectorError` on invalid input.
    """
    if not isinstance(text, str):
        raise TypeError(f"selector must be a str, not {type(text).__name__}")
    return _intern(_Parser(text, _tokenize(text)).parse())


ALL: Final = parse_selector("all()")
