"""Micro benchmark: selector evaluation against hand-written Python lambdas, measured in the same run.

Run: ``python -m bench.selector_eval``. Prints one line per selector, then one JSON line
``{"name", "value", "unit", "reference", "ratio", "goal"}`` where value/reference are nanoseconds per
evaluation (parsed selector vs the equivalent lambda) and ratio = value / reference (lower is better).
"""

from __future__ import annotations

import json
import random
import time
import timeit
from collections.abc import Callable, Mapping

from felixpy.model.selector import parse_selector

Labels = Mapping[str, str]

# Realistic policy selectors, each with the lambda a person would write for it by hand.
CASES: list[tuple[str, Callable[[Labels], bool]]] = [
    ('app == "web"', lambda L: L.get("app") == "web"),
    (
        'projectcalico.org/namespace == "prod" && app in {"api", "web"}',
        lambda L: L.get("projectcalico.org/namespace") == "prod" and L.get("app") in {"api", "web"},
    ),
    (
        'has(role) && role != "db" && !has(quarantine)',
        lambda L: "role" in L and L.get("role") != "db" and "quarantine" not in L,
    ),
    (
        '(tier == "frontend" || tier == "backend") && env starts with "prod"',
        lambda L: (L.get("tier") == "frontend" or L.get("tier") == "backend") and L.get("env", "").startswith("prod"),
    ),
    ("all()", lambda L: True),
]

GOAL = 1.1  # within 10% of the hand-written lambda


def make_labels(n: int, seed: int = 1) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        labels = {
            "projectcalico.org/namespace": rng.choice(["prod", "dev", "kube-system"]),
            "projectcalico.org/orchestrator": "k8s",
            "projectcalico.org/serviceaccount": "default",
            "app": rng.choice(["web", "api", "db", "cache"]),
            "pod-template-hash": f"{rng.getrandbits(40):x}",
            "env": rng.choice(["prod-eu", "prod-us", "staging"]),
        }
        if rng.random() < 0.7:
            labels["tier"] = rng.choice(["frontend", "backend", "data"])
        if rng.random() < 0.5:
            labels["role"] = rng.choice(["db", "worker", "edge"])
        if i % 17 == 0:
            labels["quarantine"] = "true"
        out.append(labels)
    return out


def time_per_eval(fns: list[Callable[[Labels], bool]], label_sets: list[dict[str, str]], repeat: int) -> float:
    def run() -> None:
        for fn in fns:
            for labels in label_sets:
                fn(labels)

    number = 20
    best = min(timeit.repeat(run, repeat=repeat, number=number, timer=time.perf_counter))
    return best / (number * len(fns) * len(label_sets)) * 1e9


def main() -> None:
    label_sets = make_labels(200)
    selectors = [parse_selector(text) for text, _ in CASES]
    # Correctness first: a fast wrong answer is worthless.
    for sel, (_, ref) in zip(selectors, CASES, strict=True):
        for labels in label_sets:
            assert sel.matches(labels) == ref(labels), (sel.text, labels)

    for sel, (_, ref) in zip(selectors, CASES, strict=True):
        ours = time_per_eval([sel.matches], label_sets, repeat=5)
        theirs = time_per_eval([ref], label_sets, repeat=5)
        print(f"{sel.text:<75} {ours:7.1f} ns  lambda {theirs:7.1f} ns  ratio {ours / theirs:5.2f}")

    # Interleave the two measurements so machine noise (2 shared cores) hits both alike.
    ours_runs, ref_runs = [], []
    for _ in range(5):
        ours_runs.append(time_per_eval([s.matches for s in selectors], label_sets, repeat=3))
        ref_runs.append(time_per_eval([ref for _, ref in CASES], label_sets, repeat=3))
    value, reference = min(ours_runs), min(ref_runs)

    parse_selector.cache_clear()
    start = time.perf_counter()
    for text, _ in CASES:
        parse_selector(text + " ")  # a fresh string, so it is really parsed and compiled
    parse_us = (time.perf_counter() - start) / len(CASES) * 1e6
    print(f"parse+compile: {parse_us:.1f} us per selector (uncached)")

    print(
        json.dumps(
            {
                "name": "selector_eval",
                "value": round(value, 1),
                "unit": "ns/eval",
                "reference": round(reference, 1),
                "ratio": round(value / reference, 3),
                "goal": GOAL,
            }
        )
    )


if __name__ == "__main__":
    main()
