"""Network namespaces from the stdlib: ``setns(2)`` through ctypes (Python 3.11 has no ``os.setns``).

A network namespace is named by a path to an nsfs file: ``/run/netns/<name>``, ``/proc/<pid>/ns/net``
or a runtime's bind mount (containerd may keep them under its state dir). ``setns`` changes the netns
of the *calling thread only*, so :func:`in_netns` is safe in a worker thread as long as it always
switches back (it does, in ``finally``; if even that fails the thread is unusable and we say so loudly).

Sysctls: ``/proc/sys/net/...`` is resolved against the netns of the thread that *opens* the file
(verified on kernel 6.18: after ``setns`` a thread sees and writes the target netns's
``/proc/sys/net/ipv4/conf/<if>/...`` while the other threads keep seeing their own). So
:func:`write_sysctl` writes into whatever netns the calling thread is in; wrap it in :func:`in_netns`
to reach another one. ``/proc/thread-self/net`` is ``/proc/net`` (not sysctls) and is not needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs fd: which kind of namespace it is
_SELF_NETNS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(OSError):
    """A netns path that does not exist or is not a network namespace, or a failed ``setns``."""


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace open as ``fd``."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise NetnsError(err, f"setns failed: {os.strerror(err)}")


def open_netns(path: str) -> int:
    """Open a netns path (O_RDONLY|O_CLOEXEC) and check it really is a network namespace."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(errno.ENOENT, f"netns {path} does not exist") from None
    except OSError as e:
        raise NetnsError(e.errno or errno.EINVAL, f"cannot open netns {path}: {e.strerror}") from None
    try:
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        kind = -1
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise NetnsError(errno.EINVAL, f"{path} is not a network namespace")
    return fd


def netns_exists(path: str) -> bool:
    """True if ``path`` names a network namespace (an empty path is never one)."""
    if not path:
        return False
    try:
        os.close(open_netns(path))
    except NetnsError:
        return False
    return True


def same_netns(path: str) -> bool:
    """True if ``path`` is the calling thread's current netns (no switch needed)."""
    try:
        a = os.stat(path)
        b = os.stat(_SELF_NETNS)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def in_netns(target: str | int | None) -> Iterator[None]:
    """Run the body with the calling thread inside ``target`` (a path or an open netns fd).

    ``None`` means "stay where we are" so callers need not special-case the current netns.
    """
    if target is None:
        yield
        return
    own = os.open(_SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(target, int):
            setns(target)
        else:
            fd = open_netns(target)
            try:
                setns(fd)
            finally:
                os.close(fd)
        try:
            yield
        finally:
            try:
                setns(own)
            except OSError as e:  # pragma: no cover - would need a kernel bug to reach
                raise RuntimeError(f"cannot return this thread to its own netns: {e}") from e
    finally:
        os.close(own)


def _sysctl_path(path: str) -> str:
    if path.startswith("/") or ".." in path.split("/"):
        raise ValueError(f"sysctl path must be relative to /proc/sys: {path!r}")
    return "/proc/sys/" + path


def write_sysctl(path: str, value: str | int) -> None:
    """Write ``value`` to ``/proc/sys/<path>`` in the calling thread's netns.

    ``path`` uses slashes (``net/ipv4/conf/cali1/proxy_arp``), never dots: interface names may
    contain dots (``vxlan.calico``).
    """
    fd = os.open(_sysctl_path(path), os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def read_sysctl(path: str) -> str:
    with open(_sysctl_path(path)) as f:
        return f.read().strip()
