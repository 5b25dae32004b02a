"""The only module that runs ``iptables-restore`` / ``iptables-save`` and ``ipset``.

Writes go through ``iptables-restore --noflush --wait <s> --wait-interval <µs>`` (one transaction per
table, serialised with every other iptables user by the xtables lock), as Felix and kube-proxy do;
``ipset restore -exist`` writes IP sets. Reads are ``iptables-save -t <table>`` and ``ipset save``.

Backend: ``system`` (default) runs ``iptables-restore`` etc., i.e. whatever the ``iptables`` alternative
points at (iptables-nft on Debian 12); ``legacy`` / ``nft`` pick ``iptables-legacy-*`` /
``iptables-nft-*``; ``auto`` does what Felix's ``IptablesBackend=auto`` does (:func:`detect_backend`).
Never mix backends on one host: packets traverse both and rules in the other one are invisible.

Network namespaces: a child process inherits the netns of the thread that forks it, so commands are
spawned inside ``in_netns(netns)`` (None: the calling thread's own netns, the agent's normal case).
"""

from __future__ import annotations

import re
import shutil
import subprocess

from felixpy.dataplane.shims.netns import in_netns

BACKENDS = ("system", "legacy", "nft", "auto")
_LINE_RE = re.compile(r"(?:Error occurred at line|line):? (\d+)")
_KUBE_HINTS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")


class IptablesError(RuntimeError):
    """A command failed. ``line`` is the 1-based input line iptables-restore / ipset blamed, if any."""

    def __init__(self, message: str, *, rc: int = 1, line: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc
        self.line = line


def _run(args: list[str], stdin: str, netns: str | None, timeout: float) -> subprocess.CompletedProcess[str]:
    with in_netns(netns):
        try:
            return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise IptablesError(f"{args[0]} timed out after {timeout}s") from e
        except OSError as e:
            raise IptablesError(f"cannot run {args[0]}: {e}") from e


def _failure(args: list[str], p: subprocess.CompletedProcess[str]) -> IptablesError:
    text = (p.stderr or p.stdout).strip()
    m = _LINE_RE.search(text)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("Try `")]
    return IptablesError(f"{args[0]} failed (rc={p.returncode}): {' '.join(lines)[:500]}", rc=p.returncode,
                         line=int(m.group(1)) if m else None)


def _count_rules(save_output: str) -> int:
    return sum(1 for ln in save_output.splitlines() if ln.startswith("-"))


def detect_backend(*, ip_version: int = 4, netns: str | None = None) -> str:
    """Felix's auto-detection: "nft" if iptables-nft holds kubelet's hint chains, else "legacy" if the
    legacy tables hold them, else whichever has more rules (legacy on a tie, as Felix)."""
    p = "ip6tables" if ip_version == 6 else "iptables"
    outs: dict[str, str] = {}
    for mode in ("nft", "legacy"):
        binary = f"{p}-{mode}-save"
        if shutil.which(binary) is None:
            outs[mode] = ""
            continue
        mangle = _run([binary, "-t", "mangle"], "", netns, 30).stdout
        if any(h in mangle for h in _KUBE_HINTS):
            return mode
        outs[mode] = _run([binary], "", netns, 30).stdout
    return "nft" if _count_rules(outs["nft"]) > _count_rules(outs["legacy"]) else "legacy"


class Iptables:
    """iptables-restore / iptables-save for one IP version, backend and netns."""

    def __init__(self, *, ip_version: int = 4, backend: str = "system", netns: str | None = None,
                 wait_s: int = 10, wait_interval_us: int = 50000, timeout_s: float = 60.0) -> None:
        if ip_version not in (4, 6):
            raise ValueError(f"ip_version must be 4 or 6, not {ip_version}")
        if backend not in BACKENDS:
            raise ValueError(f"iptables backend must be one of {BACKENDS}, not {backend!r}")
        self.ip_version = ip_version
        self.netns = netns
        self._want = backend
        self._backend = ""
        self._wait = [f"--wait={wait_s}", f"--wait-interval={wait_interval_us}"]
        self._timeout = timeout_s + wait_s

    @property
    def backend(self) -> str:
        """"system", "legacy" or "nft" ("auto" is resolved on first use)."""
        if not self._backend:
            self._backend = (detect_backend(ip_version=self.ip_version, netns=self.netns)
                             if self._want == "auto" else self._want)
        return self._backend

    def _binary(self, tool: str) -> str:
        p = "ip6tables" if self.ip_version == 6 else "iptables"
        name = f"{p}-{tool}" if self.backend == "system" else f"{p}-{self.backend}-{tool}"
        if shutil.which(name) is None:
            raise IptablesError(f"{name} not found (install iptables)")
        return name

    def mode(self) -> str:
        """What the binaries really drive: "nft" or "legacy" (the system default may be either)."""
        p = _run([self._binary("save"), "--version"], "", None, 10)
        return "nft" if "nf_tables" in (p.stdout + p.stderr) else "legacy"

    def restore(self, text: str) -> None:
        """``iptables-restore --noflush``: one transaction per ``*table ... COMMIT`` block."""
        args = [self._binary("restore"), "--noflush", *self._wait]
        p = _run(args, text, self.netns, self._timeout)
        if p.returncode != 0:
            raise _failure(args, p)

    def save(self, table: str, *, counters: bool = False) -> str:
        """``iptables-save -t <table>`` (``-c``: with each rule's [packets:bytes])."""
        args = [self._binary("save"), *(["-c"] if counters else []), "-t", table]
        p = _run(args, "", self.netns, self._timeout)
        if p.returncode != 0:
            raise _failure(args, p)
        return p.stdout


class Ipset:
    """``ipset restore`` / ``ipset save`` in one netns."""

    def __init__(self, *, netns: str | None = None, binary: str = "ipset", timeout_s: float = 60.0) -> None:
        self.netns = netns
        self._binary = binary
        self._timeout = timeout_s

    def _bin(self) -> str:
        if shutil.which(self._binary) is None:
            raise IptablesError(f"{self._binary} not found (install ipset)")
        return self._binary

    def restore(self, text: str) -> None:
        """Run ``ipset restore -exist``. Not atomic: lines before a failing one stay applied."""
        if not text.strip():
            return
        args = [self._bin(), "restore", "-exist"]
        p = _run(args, text, self.netns, self._timeout)
        if p.returncode != 0:
            raise _failure(args, p)

    def save(self) -> str:
        args = [self._bin(), "save"]
        p = _run(args, "", self.netns, self._timeout)
        if p.returncode != 0:
            raise _failure(args, p)
        return p.stdout
