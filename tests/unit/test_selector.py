"""Unit tests for felixpy.model.selector: Calico's selector language.

The tables restate the behaviour pinned by Calico's own parser tests and documentation
(libcalico-go/lib/selector/parser/parser_test.go, docs "Selectors" reference); the property tests compare
the compiled evaluator against an independent oracle built alongside randomly generated selector text.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felixpy.model.selector import (
    ALL,
    MAX_LABEL_LENGTH,
    MAX_NESTING,
    LabelRestriction,
    Selector,
    SelectorError,
    parse_selector,
)

Labels = Mapping[str, str]

# ---------------------------------------------------------------------------------------------------------
# Table-driven evaluation: (selector, labels that match, labels that do not match)

EVAL_CASES: list[tuple[str, list[dict[str, str]], list[dict[str, str]]]] = [
    ('a == "b"', [{"a": "b"}, {"a": "b", "c": "d"}], [{}, {"a": "c"}, {"c": "d"}]),
    (
        'a == "b" && c == "d"',
        [{"a": "b", "c": "d"}],
        [{}, {"a": "b", "c": "e"}, {"a": "c", "c": "d"}, {"a": "b"}],
    ),
    ('a == "b" || c == "d"', [{"a": "b", "c": "d"}, {"a": "b"}, {"c": "d"}], [{}, {"a": "e", "c": "e"}]),
    ('a in {"\'", \'"\', "c"}', [{"a": "c"}, {"a": '"'}, {"a": "'"}], [{}, {"a": "e"}]),
    ('a not in {"\'", \'"\', "c"}', [{}, {"a": "e"}], [{"a": "c"}, {"a": '"'}, {"a": "'"}]),
    ("a == 'a'", [{"a": "a"}], [{"a": "b"}, {}]),
    ('a != "b"', [{"a": "a"}, {}], [{"a": "b"}]),
    ('a != "a"', [{}, {"b": "a"}], [{"a": "a"}]),
    ('a contains "a"', [{"a": "a"}, {"a": "bab"}, {"a": "aaa", "b": "c"}], [{}, {"a": "b"}, {"b": "aaa"}]),
    ('a contains ""', [{"a": ""}, {"a": "x"}], [{}, {"b": ""}]),
    ('a starts with "a"', [{"a": "a"}, {"a": "abb"}], [{}, {"a": "b"}, {"a": "baa"}, {"b": "aaa"}]),
    ('a starts with ""', [{"a": ""}], [{}]),
    ('a ends with "a"', [{"a": "a"}, {"a": "bba"}], [{}, {"a": "b"}, {"a": "aab"}, {"b": "aaa"}]),
    ('a ends with ""', [{"a": "q"}], [{"b": "q"}]),
    ('a in {"a"}', [{"a": "a"}], [{"a": "b"}, {}]),
    ('!a in {"a"}', [{"a": "b"}, {}], [{"a": "a"}]),
    ('a in {"a", "b"}', [{"a": "a"}, {"a": "b"}], [{"a": "c"}, {}]),
    ('a not in {"d", "e"}', [{"a": "a"}, {}], [{"a": "d"}, {"a": "e"}]),
    ("a in {}", [], [{}, {"a": ""}, {"a": "x"}]),
    ("a not in {}", [{}, {"a": ""}, {"a": "x"}], []),
    ("has(a)", [{"a": "b"}, {"a": ""}], [{"b": "a"}, {}]),
    ("!has(a)", [{"b": "b"}, {}], [{"a": "b"}]),
    ("!!has(b)", [{"b": "x"}], [{"a": "b"}]),
    ("! has(a)", [{}], [{"a": "b"}]),
    ("!!! has(a)", [{}], [{"a": "b"}]),
    ("!! ! has(a)", [{}], [{"a": "b"}]),
    ("! !!has(a)", [{}], [{"a": "b"}]),
    ("", [{}, {"a": "b"}], []),
    (" ", [{}], []),
    ("all()", [{}, {"a": "b"}], []),
    (" all( ) ", [{}], []),
    ("global()", [{}, {"a": "b"}], []),
    ("!all()", [], [{}, {"a": "b"}]),
    ("a == 'a1' && b == 'b1'", [{"a": "a1", "b": "b1"}], [{"a": "a1"}]),
    ("a == 'a1' && b != 'b1'", [{"a": "a1"}], [{"a": "a1", "b": "b1"}]),
    ("a != 'a1' && !b == 'b1'", [{}], [{"a": "a1", "b": "b1"}, {"b": "b1"}]),
    ("has(a) && !has(b)", [{"a": "a"}], [{"a": "a", "b": "b"}, {}]),
    ("!(!has(a) || has(b))", [{"a": "a"}], [{"a": "a", "b": "b"}, {}]),
    ("a == 'a1' || b != 'b1'", [{"a": "a1", "b": "b1"}, {}], [{"b": "b1"}]),
    ("a != 'a1' || b != 'b1'", [{"a": "a1"}], [{"a": "a1", "b": "b1"}]),
    ("! a == 'a1' || ! b == 'b1'", [{}], [{"a": "a1", "b": "b1"}]),
    # && binds tighter than ||, ! tighter than both.
    ("a == 'x' || b == 'y' && c == 'z'", [{"a": "x"}, {"b": "y", "c": "z"}], [{"b": "y"}]),
    ("(a == 'x' || b == 'y') && c == 'z'", [{"a": "x", "c": "z"}], [{"a": "x"}, {"b": "y"}]),
    ("!a == 'x' && has(b)", [{"b": ""}], [{"a": "x", "b": ""}]),
    # Operator spellings Calico accepts.
    ("a notin {'x'}", [{"a": "y"}], [{"a": "x"}]),
    ("a not   in{'x'}", [{"a": "y"}], [{"a": "x"}]),
    ("a startswith 'x'", [{"a": "xy"}], [{"a": "yx"}]),
    ("a ends\twith 'x'", [{"a": "yx"}], [{"a": "xy"}]),
    ("a in {'x',}", [{"a": "x"}], [{"a": ""}]),
    ("a!='x'", [{"a": "y"}], [{"a": "x"}]),
    ("a=='x'&&b=='y'||c=='z'", [{"c": "z"}, {"a": "x", "b": "y"}], [{"a": "x"}]),
    # Keywords are ordinary label names where a label is expected.
    ("in in {'a'}", [{"in": "a"}], [{"in": "b"}]),
    ("contains contains 'x'", [{"contains": "axb"}], [{}]),
    ("has == 'x' && all != 'y'", [{"has": "x"}], [{"has": "x", "all": "y"}]),
    # Examples from Calico's documentation.
    ("k == 'v'", [{"k": "v"}], [{"k": "w"}, {}]),
    ("k != 'v'", [{"k": "w"}, {}], [{"k": "v"}]),
    ("has(k)", [{"k": ""}], [{}]),
    ("!has(k)", [{}], [{"k": "v"}]),
    ("k in { 'v1', 'v2' }", [{"k": "v1"}, {"k": "v2"}], [{"k": "v3"}, {}]),
    ("k not in { 'v1', 'v2' }", [{"k": "v3"}, {}], [{"k": "v1"}]),
    ("k contains 's'", [{"k": "xsx"}], [{"k": "x"}, {}]),
    ("k starts with 's'", [{"k": "sx"}], [{"k": "xs"}, {}]),
    ("k ends with 's'", [{"k": "xs"}], [{"k": "sx"}, {}]),
    ("role == 'database'", [{"role": "database"}], [{"role": "frontend"}]),
    (
        "type == 'application' && env != 'production'",
        [{"type": "application"}],
        [{"type": "application", "env": "production"}],
    ),
    (
        'projectcalico.org/name in {"foo", "bar"}',
        [{"projectcalico.org/name": "foo"}, {"projectcalico.org/name": "bar"}],
        [{"projectcalico.org/name": "baz"}, {"name": "foo"}],
    ),
    (
        '(foo == "bar") && (projectcalico.org/namespace == "some-namespace")',
        [{"foo": "bar", "projectcalico.org/namespace": "some-namespace"}],
        [{"foo": "bar", "projectcalico.org/namespace": "other"}, {"foo": "bar"}],
    ),
    (
        "app.kubernetes.io/name == 'web' && pcns.kubernetes.io/metadata.name starts with 'prod-'",
        [{"app.kubernetes.io/name": "web", "pcns.kubernetes.io/metadata.name": "prod-1"}],
        [{"app.kubernetes.io/name": "web", "pcns.kubernetes.io/metadata.name": "dev-1"}],
    ),
    ("projectcalico.org/orchestrator == 'k8s'", [{"projectcalico.org/orchestrator": "k8s"}], [{}]),
    ("route-reflector == 'true'", [{"route-reflector": "true"}], [{"route-reflector": "false"}]),
]


@pytest.mark.parametrize(("text", "matching", "non_matching"), EVAL_CASES)
def test_evaluation_table(text: str, matching: list[dict[str, str]], non_matching: list[dict[str, str]]) -> None:
    sel = parse_selector(text)
    reparsed = parse_selector(sel.text)
    closure = sel._root.closure()  # the fallback evaluator must agree with the compiled one
    for labels in matching:
        assert sel.matches(labels), (sel.text, labels)
        assert reparsed.matches(labels), (sel.text, labels)
        assert closure(labels), (sel.text, labels)
    for labels in non_matching:
        assert not sel.matches(labels), (sel.text, labels)
        assert not reparsed.matches(labels), (sel.text, labels)
        assert not closure(labels), (sel.text, labels)
    assert reparsed.text == sel.text
    assert reparsed.unique_id() == sel.unique_id()


# ---------------------------------------------------------------------------------------------------------
# Canonical form and unique IDs (the UIDs are the values Calico computes for the same selectors)

CANONICAL_CASES: list[tuple[str, str, str | None]] = [
    ("", "all()", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
    (" all() ", "all()", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
    (" (all() )", "all()", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
    ("! (has( b)||! has(a ))", "!(has(b) || !has(a))", "s:Iss0uCleLYv1GSv_pNm7hAO58kE9jAx1NKyG3Q"),
    ('! (a == "b"&&! c != "d")', '!(a == "b" && !c != "d")', "s:lh3haoY1ikTRkd4UZu0nWSaIBknYLPJLX16d-w"),
    ('a == "\'"', 'a == "\'"', None),
    ("a == '\"'", "a == '\"'", None),
    ("a contains '\"'", "a contains '\"'", None),
    ('a contains "\'"', 'a contains "\'"', None),
    ("a startswith '\"'", "a starts with '\"'", None),
    ('a endswith "\'"', 'a ends with "\'"', None),
    ("a!='\"'", "a != '\"'", None),
    ("a == 'b'", 'a == "b"', None),
    ('a in {"d"}', 'a in {"d"}', None),
    ('a in {"d", "a", "b"}', 'a in {"a", "b", "d"}', None),
    ('a in {"z", "z", "x", "y", "x", "a"}', 'a in {"a", "x", "y", "z"}', None),
    ("a notin {'b', '\"'}", 'a not in {\'"\', "b"}', None),
    ("a in {}", "a in {}", None),
    ("k == 'v' && x == 'y'", '(k == "v" && x == "y")', None),
    ("k == 'v' || has(x)", '(k == "v" || has(x))', None),
    ("!(k == 'v')", '!k == "v"', None),
    ("!!(k == 'v')", 'k == "v"', None),
    ("!(!all())", "!!all()", None),  # Calico renders nested negations verbatim
    ("a == 'x' || b == 'y' && c == 'z'", '(a == "x" || (b == "y" && c == "z"))', None),
    ("((a == 'x'))", 'a == "x"', None),
    ("(a == 'x' && b == 'y') && c == 'z'", '((a == "x" && b == "y") && c == "z")', None),
    ("global()", "global()", None),
    (
        "!(!(k == 'v' && has(t) || all()) && (a in {'b', 'c'}))",
        '!(!((k == "v" && has(t)) || all()) && a in {"b", "c"})',
        None,
    ),
]


@pytest.mark.parametrize(("text", "canonical", "uid"), CANONICAL_CASES)
def test_canonical_form(text: str, canonical: str, uid: str | None) -> None:
    sel = parse_selector(text)
    assert sel.text == canonical
    assert str(sel) == canonical
    again = parse_selector(canonical)
    if "!!" not in canonical:
        assert again.text == canonical
        assert again == sel and hash(again) == hash(sel)
        assert again.unique_id() == sel.unique_id()
    assert sel.unique_id().startswith("s:") and len(sel.unique_id()) == 2 + 38
    if uid is not None:
        assert sel.unique_id() == uid


def test_equal_selectors_share_one_instance_and_cache() -> None:
    a = parse_selector("a == 'x' && b in {'2', '1'}")
    b = parse_selector('a=="x"&&b in{"1","2"}')
    assert a is b
    assert parse_selector("a == 'x' && b in {'2', '1'}") is a
    assert a != parse_selector("a == 'y'")
    assert a != "not a selector"


def test_all_and_empty() -> None:
    assert parse_selector("") is ALL
    assert ALL.is_all() and ALL.text == "all()"
    assert not parse_selector("global()").is_all()
    assert not parse_selector("has(a)").is_all()


def test_pickle_round_trip() -> None:
    sel = parse_selector("a in {'x', 'y'} && !has(b)")
    assert pickle.loads(pickle.dumps(sel)) is sel
    double = parse_selector("!(!all())")
    restored = pickle.loads(pickle.dumps(double))
    assert restored.text == "!!all()" and restored.unique_id() == double.unique_id()
    assert restored.matches({"a": "b"})


# ---------------------------------------------------------------------------------------------------------
# Errors: everything Calico rejects, with the position of the offending character

BAD_CASES: list[tuple[str, int]] = [
    ("b == b", 5),  # label == label
    ("b contains b", 11),
    ("b starts with b", 14),
    ("b ends with b", 12),
    ("'b1' == b", 0),  # literal on the left
    ("b", 1),  # bare label
    ("a b", 2),
    ("!", 1),
    ('foo == "bar" &', 13),
    ('foo == "bar" |', 13),
    ("foo != ||", 7),
    ('foo in {"", ||', 12),
    ('foo in ""', 7),
    ('"FOO', 0),
    ("\"FOO'", 0),
    ("'FOO", 0),
    ("(", 1),
    ('(a == "foo"', 11),
    (")", 0),
    ("()", 1),
    ("%", 0),
    ('a == "b" && %', 12),
    ('a == "b" || %', 12),
    ("a ", 2),
    ("has(foo) &&", 11),
    ("a = 'b'", 2),
    ("a === 'b'", 4),
    ("has()", 4),
    ("has(a", 5),
    ("has (a)", 4),
    ("all(x)", 4),
    ("global(", 7),
    ("a == 'b')", 8),
    ("a == 'b' c == 'd'", 9),
    ("a in {'x' 'y'}", 10),
    ("a in {,}", 6),
    ("a in {'x'", 9),
    ("a in ('x')", 5),
    ("a inx {'x'}", 2),
    ("a ==\n'b'", 4),  # only space and tab are whitespace
    ("a == 'b' && (", 13),
    ("a.b/c-d_e == 'x' && é == 'y'", 20),
    ("has(a) in {'x'}", 7),
]


@pytest.mark.parametrize(("text", "position"), BAD_CASES)
def test_rejects_bad_selector(text: str, position: int) -> None:
    with pytest.raises(SelectorError) as info:
        parse_selector(text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.selector == text
    assert err.position == position, str(err)
    assert f"position {position}" in str(err)
    assert ">>>" in str(err) and "\n" not in str(err)


def test_error_message_names_the_problem() -> None:
    with pytest.raises(SelectorError, match=r"expected a quoted string after '==', found label 'b'"):
        parse_selector("a == b")
    with pytest.raises(SelectorError, match="unterminated string"):
        parse_selector("a == 'b")
    with pytest.raises(SelectorError, match=r"a == >>>b"):
        parse_selector("a == b")


def test_label_length_limit() -> None:
    ok = "k" * MAX_LABEL_LENGTH
    assert parse_selector(f"has({ok})").label_keys() == {ok}
    assert parse_selector(f"{ok} == 'x'").matches({ok: "x"})
    with pytest.raises(SelectorError, match="longer than"):
        parse_selector(f"has({ok}k)")
    with pytest.raises(SelectorError, match="longer than"):
        parse_selector(f"{ok}k == 'x'")


def test_nesting_limit_and_closure_fallback() -> None:
    # Deep but legal nesting is still evaluated correctly; past CPython's compiler limits the selector
    # falls back to the closure evaluator.
    depth = MAX_NESTING
    text = "a == 'x'"
    for i in range(depth):
        text = f"!(has(k{i}) || {text})" if i % 2 else f"(has(k{i}) && {text})"
    sel = parse_selector(text)
    assert parse_selector(sel.text) is sel

    def oracle(labels: Labels) -> bool:
        result = labels.get("a") == "x"
        for i in range(depth):
            has = f"k{i}" in labels
            result = not (has or result) if i % 2 else (has and result)
        return result

    every_even = {f"k{i}": "" for i in range(0, depth, 2)}
    for labels in ({}, {"a": "x"}, every_even, {**every_even, "a": "x"}, {"k1": "", **every_even}):
        assert sel.matches(labels) == oracle(labels), labels
    with pytest.raises(SelectorError, match="nested deeper"):
        parse_selector("(" * (MAX_NESTING + 1) + "all()" + ")" * (MAX_NESTING + 1))


def test_not_a_string() -> None:
    with pytest.raises(TypeError):
        parse_selector(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Label keys, restrictions, prefixing


def test_label_keys() -> None:
    sel = parse_selector("(a == 'x' || !has(b)) && c in {'1'} && d not in {} && e contains 'q' && all()")
    assert sel.label_keys() == {"a", "b", "c", "d", "e"}
    assert ALL.label_keys() == frozenset()
    assert parse_selector("projectcalico.org/namespace == 'ns'").label_keys() == {"projectcalico.org/namespace"}


RESTRICTION_CASES: list[tuple[str, dict[str, LabelRestriction]]] = [
    ("all()", {}),
    ("a == 'b'", {"a": LabelRestriction(must_be_present=True, one_of=frozenset({"b"}))}),
    ("a != 'b'", {}),
    ("has(a)", {"a": LabelRestriction(must_be_present=True)}),
    ("!has(a)", {"a": LabelRestriction(must_be_absent=True)}),
    ("!a == 'b'", {}),
    ("a contains 'b'", {"a": LabelRestriction(must_be_present=True)}),
    ("a in {'x', 'y'}", {"a": LabelRestriction(must_be_present=True, one_of=frozenset({"x", "y"}))}),
    ("a not in {'x'}", {}),
    (
        "a == 'b' && has(c)",
        {
            "a": LabelRestriction(must_be_present=True, one_of=frozenset({"b"})),
            "c": LabelRestriction(must_be_present=True),
        },
    ),
    ("a == 'B' && a == 'C'", {"a": LabelRestriction(must_be_present=True, one_of=frozenset())}),
    (
        "a in {'x', 'y'} && a in {'y', 'z'}",
        {"a": LabelRestriction(must_be_present=True, one_of=frozenset({"y"}))},
    ),
    ("a == 'x' || a == 'y'", {"a": LabelRestriction(must_be_present=True, one_of=frozenset({"x", "y"}))}),
    ("a == 'x' || has(a)", {"a": LabelRestriction(must_be_present=True)}),
    ("a == 'x' || b == 'y'", {}),
    ("!has(a) || !has(a) && has(b)", {"a": LabelRestriction(must_be_absent=True)}),
    ("has(a) && !has(a)", {"a": LabelRestriction(must_be_present=True, must_be_absent=True)}),
]


@pytest.mark.parametrize(("text", "expected"), RESTRICTION_CASES)
def test_label_restrictions(text: str, expected: dict[str, LabelRestriction]) -> None:
    assert dict(parse_selector(text).label_restrictions()) == expected


def test_restriction_satisfiability() -> None:
    assert not parse_selector("a == 'B' && a == 'C'").label_restrictions()["a"].possible_to_satisfy()
    assert not parse_selector("has(a) && !has(a)").label_restrictions()["a"].possible_to_satisfy()
    assert parse_selector("a in {'x'}").label_restrictions()["a"].possible_to_satisfy()


PREFIX_CASES: list[tuple[str, str]] = [
    ("k == 'v'", 'visited/k == "v"'),
    ("k != 'v'", 'visited/k != "v"'),
    ("k contains 'v'", 'visited/k contains "v"'),
    ("k starts with 'v'", 'visited/k starts with "v"'),
    ("k ends with 'v'", 'visited/k ends with "v"'),
    ("k == 'v' && x == 'y'", '(visited/k == "v" && visited/x == "y")'),
    ("k == 'v' || has(x)", '(visited/k == "v" || has(visited/x))'),
    ("!(k == 'v')", '!visited/k == "v"'),
    ("k in {'v'}", 'visited/k in {"v"}'),
    ("k not in {'v'}", 'visited/k not in {"v"}'),
    ("all()", "all()"),
    (
        "!(!(k == 'v' && has(t) || all()) && (a in {'b', 'c'}))",
        '!(!((visited/k == "v" && has(visited/t)) || all()) && visited/a in {"b", "c"})',
    ),
]


@pytest.mark.parametrize(("text", "expected"), PREFIX_CASES)
def test_with_label_prefix(text: str, expected: str) -> None:
    original = parse_selector(text)
    prefixed = original.with_label_prefix("visited/")
    assert prefixed.text == expected
    assert parse_selector(expected) is prefixed
    assert original.text == parse_selector(text).text  # the original is untouched
    labels = {"k": "v", "x": "y", "t": "", "a": "b"}
    assert prefixed.matches({"visited/" + k: v for k, v in labels.items()}) == original.matches(labels)


# ---------------------------------------------------------------------------------------------------------
# Property tests. A generated expression carries its text, an independent oracle and whether it is
# atomic (can be an operand of ! / && / || without parentheses).

KEYS = ["a", "b", "c", "app.kubernetes.io/name", "projectcalico.org/namespace", "x-y_z"]
VALUES = ["", "a", "b", "ab", "ba", "web-1", 'say "hi"', "it's", "ü"]
Gen = tuple[str, Callable[[Labels], bool], bool]

keys = st.sampled_from(KEYS)
values = st.sampled_from(VALUES)
ws = st.sampled_from(["", " ", "  ", "\t"])
ws1 = st.sampled_from([" ", "  ", "\t"])
label_sets = st.dictionaries(keys, values, max_size=len(KEYS))


@st.composite
def quoted(draw: st.DrawFn, value: str) -> str:
    options = [q for q in "\"'" if q not in value]
    q = draw(st.sampled_from(options))
    return f"{q}{value}{q}"


@st.composite
def leaves(draw: st.DrawFn) -> Gen:
    k = draw(keys)
    kind = draw(st.sampled_from(["has", "eq", "ne", "contains", "starts", "ends", "in", "notin", "all", "global"]))
    if kind == "has":
        return f"has({draw(ws)}{k}{draw(ws)})", lambda L: k in L, True
    if kind in ("all", "global"):
        return f"{kind}({draw(ws)})", lambda L: True, True
    if kind in ("in", "notin"):
        vs = draw(st.lists(values, max_size=4))
        items = [draw(ws) + draw(quoted(v)) + draw(ws) for v in vs]
        body = ",".join(items) + ("," if bool(vs) and draw(st.booleans()) else "")
        if kind == "in":
            op = draw(st.sampled_from(["in", "in "]))
            return f"{k}{draw(ws1)}{op}{{{body}}}", lambda L: k in L and L[k] in vs, True
        op = draw(st.sampled_from(["not in", "notin", "not  in", "not\tin "]))
        return f"{k}{draw(ws1)}{op}{{{body}}}", lambda L: k not in L or L[k] not in vs, True
    v = draw(values)
    lit = draw(quoted(v))
    if kind == "eq":
        return f"{k}{draw(ws)}=={draw(ws)}{lit}", lambda L: k in L and L[k] == v, True
    if kind == "ne":
        return f"{k}{draw(ws)}!={draw(ws)}{lit}", lambda L: k not in L or L[k] != v, True
    if kind == "contains":
        return f"{k}{draw(ws1)}contains{draw(ws)}{lit}", lambda L: k in L and v in L[k], True
    if kind == "starts":
        op = draw(st.sampled_from(["starts with", "startswith", "starts\twith"]))
        return f"{k}{draw(ws1)}{op}{draw(ws)}{lit}", lambda L: k in L and L[k].startswith(v), True
    op = draw(st.sampled_from(["ends with", "endswith"]))
    return f"{k}{draw(ws1)}{op}{draw(ws)}{lit}", lambda L: k in L and L[k].endswith(v), True


def _operand(draw: st.DrawFn, g: Gen) -> str:
    text, _, atomic = g
    if atomic and not draw(st.booleans()):
        return text
    return f"({draw(ws)}{text}{draw(ws)})"


def _extend(children: st.SearchStrategy[Gen]) -> st.SearchStrategy[Gen]:
    @st.composite
    def negation(draw: st.DrawFn) -> Gen:
        child = draw(children)
        fn = child[1]
        return f"!{draw(ws)}{_operand(draw, child)}", lambda L: not fn(L), True

    @st.composite
    def conjunction(draw: st.DrawFn) -> Gen:
        parts = draw(st.lists(children, min_size=2, max_size=3))
        fns = [p[1] for p in parts]
        text = "&&".join(f"{draw(ws)}{_operand(draw, p)}{draw(ws)}" for p in parts)
        return text, lambda L: all(f(L) for f in fns), False

    @st.composite
    def disjunction(draw: st.DrawFn) -> Gen:
        parts = draw(st.lists(children, min_size=2, max_size=3))
        fns = [p[1] for p in parts]
        text = "||".join(f"{draw(ws)}{_operand(draw, p)}{draw(ws)}" for p in parts)
        return text, lambda L: any(f(L) for f in fns), False

    @st.composite
    def parens(draw: st.DrawFn) -> Gen:
        text, fn, _ = draw(children)
        return f"({draw(ws)}{text}{draw(ws)})", fn, True

    return st.one_of(negation(), conjunction(), disjunction(), parens())


expressions = st.recursive(leaves(), _extend, max_leaves=10)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(expressions, st.lists(label_sets, min_size=1, max_size=8))
def test_matches_oracle(expr: Gen, label_list: list[dict[str, str]]) -> None:
    text, oracle, _ = expr
    sel = parse_selector(text)
    closure = sel._root.closure()
    for labels in label_list:
        expected = oracle(labels)
        assert sel.matches(labels) == expected, (text, sel.text, labels)
        assert closure(labels) == expected, (text, sel.text, labels)


@FAST
@given(expressions, st.lists(label_sets, min_size=1, max_size=8))
def test_canonical_text_reparses_to_equivalent_selector(expr: Gen, label_list: list[dict[str, str]]) -> None:
    sel = parse_selector(expr[0])
    again = parse_selector(sel.text)
    for labels in label_list:
        assert again.matches(labels) == sel.matches(labels)
    # As in Calico, "!(!x)" renders as "!!x", which re-parses to "x"; one more round is a fixed point.
    if "!!" not in sel.text:
        assert again is sel
    assert parse_selector(again.text) is again


@FAST
@given(expressions, st.lists(label_sets, min_size=1, max_size=8))
def test_negation(expr: Gen, label_list: list[dict[str, str]]) -> None:
    sel = parse_selector(expr[0])
    negated = parse_selector(f"!({expr[0]})")
    double = parse_selector(f"!!({expr[0]})")
    assert parse_selector(f"!({negated.text})").matches({}) == sel.matches({})
    for labels in label_list:
        assert negated.matches(labels) == (not sel.matches(labels))
        assert double.matches(labels) == sel.matches(labels)


@FAST
@given(expressions, expressions, st.lists(label_sets, min_size=1, max_size=8))
def test_de_morgan(a: Gen, b: Gen, label_list: list[dict[str, str]]) -> None:
    not_and = parse_selector(f"!(({a[0]}) && ({b[0]}))")
    or_not = parse_selector(f"!({a[0]}) || !({b[0]})")
    not_or = parse_selector(f"!(({a[0]}) || ({b[0]}))")
    and_not = parse_selector(f"!({a[0]}) && !({b[0]})")
    for labels in label_list:
        assert not_and.matches(labels) == or_not.matches(labels)
        assert not_or.matches(labels) == and_not.matches(labels)


@FAST
@given(expressions, st.lists(label_sets, min_size=1, max_size=8))
def test_label_keys_cover_every_dependency(expr: Gen, label_list: list[dict[str, str]]) -> None:
    sel = parse_selector(expr[0])
    keys_used = sel.label_keys()
    for labels in label_list:
        relevant = {k: v for k, v in labels.items() if k in keys_used}
        noise = {**relevant, "unrelated/key": "v", "zzz": ""}
        assert sel.matches(relevant) == sel.matches(labels) == sel.matches(noise)


@FAST
@given(expressions, st.lists(label_sets, min_size=1, max_size=12))
def test_label_restrictions_are_necessary(expr: Gen, label_list: list[dict[str, str]]) -> None:
    sel = parse_selector(expr[0])
    restrictions = sel.label_restrictions()
    for labels in label_list:
        if not sel.matches(labels):
            continue
        for key, r in restrictions.items():
            assert r.possible_to_satisfy()
            if r.must_be_present:
                assert key in labels
            if r.must_be_absent:
                assert key not in labels
            if r.one_of is not None:
                assert labels[key] in r.one_of


@FAST
@given(expressions, st.sampled_from(["pcns.", "pcsa.", "p/"]), st.lists(label_sets, min_size=1, max_size=6))
def test_prefix_is_a_renaming(expr: Gen, prefix: str, label_list: list[dict[str, str]]) -> None:
    sel = parse_selector(expr[0])
    prefixed = sel.with_label_prefix(prefix)
    assert prefixed.label_keys() == {prefix + k for k in sel.label_keys()}
    for labels in label_list:
        assert prefixed.matches({prefix + k: v for k, v in labels.items()}) == sel.matches(labels)


SELECTOR_ALPHABET = st.text(alphabet="ab/.-_ ()!&|=\"'{},\tinotcaeshlwrdg", max_size=40)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=30), SELECTOR_ALPHABET))
def test_arbitrary_input_parses_or_raises_selector_error(text: str) -> None:
    try:
        sel = parse_selector(text)
    except SelectorError as err:
        assert 0 <= err.position <= len(text)
        return
    assert isinstance(sel, Selector)
    again = parse_selector(sel.text)
    assert parse_selector(again.text) is again
    sel.matches({"a": "b"})


@FAST
@given(expressions)
def test_surrounding_whitespace_does_not_change_identity(expr: Gen) -> None:
    sel = parse_selector(expr[0])
    padded = parse_selector(f" \t {expr[0]}\t ")
    assert padded is sel
    assert padded.unique_id() == sel.unique_id()
