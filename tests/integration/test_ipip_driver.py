"""The IPIP device driver against the real kernel. On kernels without the ipip module (like the CI
machine) the driver must do nothing harmful and say why; where IPIP exists, tunl0 gets programmed."""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest

from felixpy.dataplane.drivers.ipip import IpipDevice, IpipParams
from felixpy.dataplane.shims.netlink import Netlink, NetlinkError

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]

RUN = f"fxip{os.getpid() % 100000}{secrets.token_hex(2)}"
A = ipaddress.IPv4Address


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def ns(make_ns: Callable[[], str]) -> str:
    return make_ns()


@pytest.fixture
def nl(ns: str) -> Iterator[Netlink]:
    with Netlink(f"/run/netns/{ns}") as sock:
        yield sock


def test_unsupported_kernel_is_harmless_and_explained(ns: str, nl: Netlink, caplog: pytest.LogCaptureFixture) -> None:
    ok, reason = nl.ipip_supported()
    if ok:
        pytest.skip(f"this kernel supports IPIP ({reason}); the unsupported path cannot be exercised")
    links_before = [ln.name for ln in nl.links()]
    drv = IpipDevice(nl)
    drv.set_device(IpipParams(tunnel_addr=A("10.244.5.0"), mtu=1480))
    with caplog.at_level("WARNING"):
        stats = drv.apply()
        drv.queue_resync()  # re-probes, but the same reason is not logged twice
        drv.apply()
    assert stats.writes == 0 and stats.errors == []
    assert [ln.name for ln in nl.links()] == links_before  # nothing created, not even the probe
    assert drv.supported is False and drv.reason == reason
    assert drv.status() == f"IPIP is enabled but unavailable: {reason}"
    assert "ipip module missing" in drv.status()
    assert sum("IPIP is enabled but cannot be used" in r.getMessage() for r in caplog.records) == 1
    # Disabled: nothing to say.
    drv.set_device(None)
    drv.allow_removals()
    assert drv.apply().writes == 0 and drv.status() == ""


def test_tunl0_is_programmed_where_supported(ns: str, nl: Netlink) -> None:
    ok, reason = nl.ipip_supported()
    if not ok:
        print(f"skipping: {reason}")
        pytest.skip(reason)
    changed: list[str] = []
    drv = IpipDevice(nl, on_link_change=changed.append)
    drv.set_device(IpipParams(tunnel_addr=A("10.244.5.0"), mtu=1480))
    stats = drv.apply()
    assert stats.errors == [] and drv.status() == "" and drv.supported is True
    link = nl.link("tunl0")
    assert link is not None and link.kind == "ipip" and link.mtu == 1480 and link.up
    assert drv.ifindex() == link.index
    assert "inet 10.244.5.0/32" in ip(ns, "-4", "addr", "show", "dev", "tunl0")
    assert drv.apply().writes == 0  # nothing dirty
    drv.queue_resync()
    assert drv.apply().writes == 0  # re-read: already right
    # A stray address and MTU drift are repaired; a new tunnel address replaces the old one.
    ip(ns, "addr", "add", "10.9.9.9/24", "dev", "tunl0")
    ip(ns, "link", "set", "tunl0", "mtu", "1300")
    drv.set_device(IpipParams(tunnel_addr=A("10.244.6.0"), mtu=1480))
    stats = drv.apply()
    assert stats.errors == [] and stats.writes == 4
    text = ip(ns, "-4", "addr", "show", "dev", "tunl0")
    assert "10.244.6.0/32" in text and "10.244.5.0" not in text and "10.9.9.9" not in text and "mtu 1480" in text
    # Disabled: the addresses go once removals are allowed; the device stays (the kernel's own).
    drv.set_device(None)
    assert drv.apply().writes == 0 and "10.244.6.0" in ip(ns, "-4", "addr", "show", "dev", "tunl0")
    drv.allow_removals()
    assert drv.apply().writes == 1
    assert "inet " not in ip(ns, "-4", "addr", "show", "dev", "tunl0") and nl.link("tunl0") is not None


def test_add_ipip_error_names_the_missing_module(nl: Netlink) -> None:
    ok, reason = nl.ipip_supported()
    if ok:
        pytest.skip(f"this kernel supports IPIP ({reason})")
    with pytest.raises(NetlinkError) as ei:
        nl.add_ipip("tunl0", mtu=1480)
    assert ei.value.errno == errno.EOPNOTSUPP
    assert str(ei.value) == "add ipip tunl0: Operation not supported (kernel has no IPIP support (ipip module missing))"


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="MTU"):
        IpipParams(tunnel_addr=A("10.244.5.0"), mtu=20)
    with pytest.raises(ValueError, match="IPv4"):
        IpipParams(tunnel_addr="10.244.5.0")  # type: ignore[arg-type]
    assert IpipParams(tunnel_addr=None).mtu is None
