"""Shared fixtures for the kernel-level integration tests."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def make_ns(request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """Factory of fresh network namespaces, all removed after the test.

    Names start with the module's ``RUN`` prefix (unique per run) so parallel runs never collide.
    """
    prefix = getattr(request.module, "RUN", f"fxit{os.getpid() % 100000}{secrets.token_hex(2)}")
    made: list[str] = []

    def make() -> str:
        name = f"{prefix}-{len(made)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        return name

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], check=False)
