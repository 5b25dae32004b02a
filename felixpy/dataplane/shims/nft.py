"""The only module that talks to nftables.

Two interchangeable backends behind :class:`Nft`:

- ``lib`` (preferred): libnftables in-process through Debian's ``python3-nftables`` module (a thin
  ctypes wrapper over ``libnftables.so.1``). Measured on this machine (shared reference,
  dataplane-measurements §1): ~1.5 ms for an incremental chain rewrite against ~20 ms for ``nft -f -``,
  because no process is spawned; one ``cmd()`` call is one kernel transaction (all or nothing).
- ``cli``: ``nft -f -`` / ``nft -j list ...`` subprocesses, used when the module or the library is
  missing. Same text syntax, same transaction semantics, just slower.

Commands are nft's text syntax (what ``nft -f`` reads); listings come back as parsed JSON (``nft -j``),
which is stable across versions, unlike the text listing that nft normalises on output.

Network namespaces: a netlink socket belongs to the netns of the thread that created it, and a child
process inherits the netns of the thread that forks it (both verified on kernel 6.18). So the libnftables
context is created, and every subprocess forked, inside ``in_netns(netns)``; ``netns=None`` is the
calling thread's own netns (the agent's normal case). The library context is created lazily on first use,
so building an :class:`Nft` touches nothing (unit tests construct drivers without root).

Thread safety: one context must not be used by two threads at once; a lock serialises calls (the
dataplane runs everything in one worker thread anyway).
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import subprocess
import sys
import threading
from types import ModuleType
from typing import Any

from felixpy.dataplane.shims.netns import in_netns

log = logging.getLogger(__name__)

_DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
BACKENDS = ("auto", "lib", "cli")


class NftError(RuntimeError):
    """nft rejected a command batch (nothing of it was applied) or a listing failed."""

    def __init__(self, message: str, *, rc: int = 1, commands: str = "") -> None:
        super().__init__(message)
        self.rc = rc
        self.commands = commands

    @property
    def not_found(self) -> bool:
        """The object listed or changed does not exist (ENOENT)."""
        return "No such file or directory" in str(self)


def _load_module() -> tuple[ModuleType | None, str]:
    """Debian's ``nftables`` module, from the venv if it sees system packages, else from Debian's path."""
    try:
        return importlib.import_module("nftables"), ""
    except ImportError as e:
        first = str(e)
    added = _DEBIAN_DIST_PACKAGES not in sys.path
    if added:
        sys.path.append(_DEBIAN_DIST_PACKAGES)
    try:
        return importlib.import_module("nftables"), ""
    except ImportError as e:
        return None, f"python3-nftables not importable ({first}; {e})"
    finally:
        if added:
            sys.path.remove(_DEBIAN_DIST_PACKAGES)


def _clean_error(text: str) -> str:
    # libnftables prints the failing command and a caret line after the message; keep the message.
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    msgs = [ln for ln in lines if ln.startswith(("Error:", "Warning:", "internal:"))]
    return "; ".join(msgs) if msgs else " | ".join(lines[:3])


class Nft:
    """nftables access for one network namespace (None: the calling thread's own)."""

    def __init__(self, netns: str | None = None, *, backend: str = "auto", nft_binary: str = "nft") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"nft backend must be one of {BACKENDS}, not {backend!r}")
        self.netns = netns
        self._want = backend
        self._nft_binary = nft_binary
        self._lock = threading.Lock()
        self._ctx: Any = None
        self._backend = ""  # resolved on first use
        self.backend_reason = ""

    # -- backend selection --------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """"lib" or "cli" (resolves the choice if nothing has run yet)."""
        with self._lock:
            self._resolve()
        return self._backend

    def _resolve(self) -> None:
        if self._backend:
            return
        if self._want in ("auto", "lib"):
            mod, why = _load_module()
            if mod is not None:
                try:
                    with in_netns(self.netns):
                        ctx = mod.Nftables()
                    ctx.set_json_output(True)
                    # Protocol numbers, not names, so set elements and listings compare stably.
                    ctx.set_numeric_proto_output(True)
                    self._ctx = ctx
                    self._backend = "lib"
                    return
                except OSError as e:  # libnftables.so.1 missing
                    why = f"libnftables unusable: {e}"
            if self._want == "lib":
                raise NftError(f"nft backend 'lib' requested but {why}")
            self.backend_reason = why
            log.warning("using the nft command instead of libnftables: %s", why)
        if shutil.which(self._nft_binary) is None:
            raise NftError(f"neither libnftables nor the {self._nft_binary!r} command is available")
        self._backend = "cli"

    # -- commands -----------------------------------------------------------------------------------
    def run(self, commands: str, *, dry_run: bool = False) -> None:
        """Run a batch of nft commands (text syntax, one per line) as ONE transaction.

        ``dry_run`` asks the kernel to check the batch without committing it. Raises :class:`NftError`
        (nothing applied) if the batch is rejected.
        """
        if not commands.strip():
            return
        with self._lock:
            self._resolve()
            if self._backend == "lib":
                ctx = self._ctx
                ctx.set_dry_run(dry_run)
                try:
                    rc, _out, err = ctx.cmd(commands)
                finally:
                    if dry_run:
                        ctx.set_dry_run(False)
            else:
                args = [self._nft_binary, *(["-c"] if dry_run else []), "-f", "-"]
                rc, _out, err = self._spawn(args, commands)
        if rc != 0:
            raise NftError(_clean_error(err) or f"nft failed (rc={rc})", rc=rc, commands=commands)

    def list_json(self, what: str) -> list[dict[str, Any]]:
        """``list <what>`` (e.g. ``table ip calico``) as the list of JSON objects, metainfo dropped.

        Raises :class:`NftError` (``.not_found`` set if the object does not exist).
        """
        with self._lock:
            self._resolve()
            if self._backend == "lib":
                rc, out, err = self._ctx.cmd(f"list {what}")
            else:
                rc, out, err = self._spawn([self._nft_binary, "-j", "-p", "list", *what.split()], "")
        if rc != 0:
            raise NftError(_clean_error(err) or f"nft list {what} failed (rc={rc})", rc=rc)
        if not out.strip():
            return []
        try:
            doc = json.loads(out)
        except json.JSONDecodeError as e:
            raise NftError(f"nft list {what}: unparseable JSON: {e}") from e
        items = doc.get("nftables", []) if isinstance(doc, dict) else []
        return [o for o in items if isinstance(o, dict) and "metainfo" not in o]

    def table_names(self, family: str) -> set[str]:
        """Names of the tables of one family."""
        return {o["table"]["name"] for o in self.list_json(f"tables {family}") if "table" in o}

    def _spawn(self, args: list[str], stdin: str) -> tuple[int, str, str]:
        with in_netns(self.netns):
            try:
                p = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                return 1, "", f"Error: {e}"
        return p.returncode, p.stdout, p.stderr
