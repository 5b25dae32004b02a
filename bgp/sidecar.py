"""Supervisor of the ExaBGP sidecar container (``felixpy bgp-sidecar --dir DIR`` / ``python -m bgp.sidecar``).

The agent writes ``DIR/exabgp.conf`` and ``DIR/exabgp.env`` (use :func:`write_config`, it is atomic). This
process waits for both, runs ``exabgp server DIR/exabgp.conf`` in the foreground with ``EXABGP_ENVFILE``,
restarts it whenever it exits (with backoff; ExaBGP also exits by itself after its helper died 5 times in a
minute), asks it to reload with SIGUSR1 when the config changes (never SIGHUP: ExaBGP shuts down on it),
restarts it when the env file changes (ExaBGP reads it only at start), and forwards SIGTERM/SIGINT before
exiting. ExaBGP's pid is kept in ``DIR/exabgp.pid`` while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

CONF_NAME = "exabgp.conf"
ENV_NAME = "exabgp.env"
PID_NAME = "exabgp.pid"
POLL_INTERVAL = 0.5
# ExaBGP installs its SIGUSR1 handler only after importing and parsing; before that SIGUSR1 would kill it.
RELOAD_SETTLE = 3.0
STOP_TIMEOUT = 6.0  # ExaBGP itself waits 2 s for its helper before killing it
BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
HEALTHY_RUN = 30.0  # a run this long resets the backoff


def _atomic_write(path: Path, text: str, mode: int) -> bool:
    """Write ``text`` to ``path`` via rename unless it already holds exactly that; True if written."""
    data = text.encode()
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def write_config(bgp_dir: str, conf_text: str, env_text: str) -> bool:
    """Atomically (re)write the sidecar's files; True if either changed. The env file is written first so
    that a restart caused by an env change also loads the new config. Mode 0600: the config may hold
    BGP passwords."""
    d = Path(bgp_dir)
    d.mkdir(parents=True, exist_ok=True)
    changed = _atomic_write(d / ENV_NAME, env_text, 0o600)
    changed = _atomic_write(d / CONF_NAME, conf_text, 0o600) or changed
    return changed


def exabgp_pid(bgp_dir: str) -> int | None:
    """The pid of the running ExaBGP as recorded by the sidecar, if any."""
    try:
        return int((Path(bgp_dir) / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def default_exabgp_argv() -> list[str]:
    """``exabgp server`` from the same environment as this interpreter."""
    script = Path(sys.executable).parent / "exabgp"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "server"]
    return [sys.executable, "-m", "exabgp", "server"]


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


class _Supervisor:
    def __init__(self, bgp_dir: str, exabgp_argv: Sequence[str] | None, poll: float) -> None:
        self.dir = Path(bgp_dir)
        self.conf = self.dir / CONF_NAME
        self.env = self.dir / ENV_NAME
        self.pidfile = self.dir / PID_NAME
        self.argv = list(exabgp_argv) if exabgp_argv else default_exabgp_argv()
        self.poll = poll
        self.stop_signal: int | None = None
        self.reload_requested = False
        self.proc: subprocess.Popen[bytes] | None = None

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum

    def _on_hup(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.stop_signal is None and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, self.poll))

    def _wait_for_files(self) -> bool:
        said = False
        while self.stop_signal is None:
            if self.conf.is_file() and self.env.is_file():
                return True
            if not said:
                log.info("waiting for %s and %s", self.conf, self.env)
                said = True
            self._sleep(self.poll)
        return False

    def _start(self) -> tuple[bytes | None, bytes | None]:
        env_seen = _read(self.env)
        conf_seen = _read(self.conf)
        child_env = dict(os.environ)
        child_env["EXABGP_ENVFILE"] = str(self.env)
        self.proc = subprocess.Popen([*self.argv, str(self.conf)], env=child_env, stdin=subprocess.DEVNULL)
        _atomic_write(self.pidfile, f"{self.proc.pid}\n", 0o644)
        log.info("started ExaBGP pid %d: %s %s", self.proc.pid, " ".join(self.argv), self.conf)
        return conf_seen, env_seen

    def _stop_child(self, sig: int) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("ExaBGP pid %d ignored signal %d; killing it", proc.pid, sig)
            proc.kill()
            proc.wait()

    def _clear_pid(self) -> None:
        with contextlib.suppress(OSError):
            self.pidfile.unlink()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        backoff = BACKOFF_MIN
        try:
            while self.stop_signal is None:
                if not self._wait_for_files():
                    break
                conf_seen, env_seen = self._start()
                assert self.proc is not None
                started = time.monotonic()
                reload_pending = False
                while self.stop_signal is None:
                    try:
                        rc: int | None = self.proc.wait(self.poll)
                    except subprocess.TimeoutExpired:
                        rc = None
                    if rc is not None:
                        break
                    env_now = _read(self.env)
                    if env_now is not None and env_now != env_seen:
                        log.info("ExaBGP env file changed; restarting ExaBGP")
                        self._stop_child(signal.SIGTERM)
                        backoff = 0.0
                        break
                    conf_now = _read(self.conf)
                    if conf_now is not None and conf_now != conf_seen:
                        conf_seen = conf_now
                        reload_pending = True
                    if self.reload_requested:
                        self.reload_requested = False
                        reload_pending = True
                    if reload_pending and time.monotonic() - started >= RELOAD_SETTLE:
                        log.info("ExaBGP config changed; reloading (SIGUSR1)")
                        with contextlib.suppress(ProcessLookupError):
                            self.proc.send_signal(signal.SIGUSR1)
                        reload_pending = False
                if self.stop_signal is not None:
                    break
                rc = self.proc.poll()
                self._clear_pid()
                ran = time.monotonic() - started
                if backoff and ran >= HEALTHY_RUN:
                    backoff = BACKOFF_MIN
                if backoff:
                    log.warning("ExaBGP exited (rc=%s) after %.1f s; restarting in %.1f s", rc, ran, backoff)
                self._sleep(backoff)
                backoff = min(max(backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
            if self.stop_signal is not None:
                log.info("signal %d: stopping ExaBGP", self.stop_signal)
                self._stop_child(signal.SIGTERM)
            return 0
        finally:
            self._clear_pid()


def run_sidecar(bgp_dir: str, *, exabgp_argv: Sequence[str] | None = None, poll_interval: float = POLL_INTERVAL) -> int:
    """Supervise ExaBGP for the files in ``bgp_dir`` until SIGTERM/SIGINT; returns the exit code.

    Must run in the main thread (it installs signal handlers). ``exabgp_argv`` defaults to
    ``<venv>/bin/exabgp server``; the config path is appended.
    """
    return _Supervisor(bgp_dir, exabgp_argv, poll_interval).run()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bgp.sidecar", description="run and supervise the ExaBGP sidecar")
    parser.add_argument("--dir", required=True, help="directory holding exabgp.conf and exabgp.env")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s bgp-sidecar: %(message)s")
    return run_sidecar(args.dir)


if __name__ == "__main__":
    sys.exit(main())
