"""MasqManager without a kernel: the drivers' setters only record desired state, so a real NftTable and
a real IptablesDataplane (never applied) show exactly what the manager asks for."""

from __future__ import annotations

import ipaddress

import pytest

from felixpy.calc.messages import HostTunnelUpdate
from felixpy.dataplane.drivers.iptables import IpSets, IptablesDataplane, IptablesTable
from felixpy.dataplane.drivers.nftables import BaseChain, NftTable
from felixpy.dataplane.masq_mgr import (
    IPPoolRemove,
    IPPoolUpdate,
    MasqManager,
    NatOptions,
    make_nat_backend,
)

N = ipaddress.ip_network
MASQ = "cali40masq-ipam-pools"
ALL = "cali40all-ipam-pools"
NFT_RULE = "ip saddr @cali40masq-ipam-pools ip daddr != @cali40all-ipam-pools counter masquerade fully-random"
IPT_RULE = ("-m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst "
            "-j MASQUERADE --random-fully")


def pool(cidr: str, nat: bool = False, disabled: bool = False) -> IPPoolUpdate:
    return IPPoolUpdate(cidr=N(cidr), nat_outgoing=nat, disabled=disabled, ipip_mode="Never", vxlan_mode="Never")


def host(vxlan: bool = False, ipip: bool = False) -> HostTunnelUpdate:
    return HostTunnelUpdate(node_ip=ipaddress.IPv4Interface("192.0.2.1/24"), vxlan_enabled=vxlan,
                            vxlan_tunnel_ip=ipaddress.IPv4Address("10.65.1.0") if vxlan else None,
                            vxlan_mac="66:00:00:00:00:01", ipip_enabled=ipip, ipip_tunnel_ip=None)


def nft_mgr() -> tuple[NftTable, MasqManager]:
    t = NftTable()
    return t, MasqManager(t)


def ipt_mgr() -> tuple[IptablesDataplane, MasqManager]:
    dp = IptablesDataplane([IptablesTable("nat")], IpSets())
    return dp, MasqManager(dp)


def test_empty_state_still_programs_sets_chains_and_hook() -> None:
    t, m = nft_mgr()
    m.complete_deferred_work()
    assert t.desired_elements(MASQ) == {} and t.desired_elements(ALL) == {}
    assert t.desired_rules("nat-cali-nat-outgoing") == ()  # the chain exists (it is jumped to), empty
    assert t.desired_rules("nat-cali-POSTROUTING") == ("jump nat-cali-nat-outgoing",)
    assert t.desired_rules("nat-POSTROUTING") == ("jump nat-cali-POSTROUTING",)
    assert t.desired_base("nat-POSTROUTING") == BaseChain("nat", "postrouting", 110, "accept")


def test_nat_outgoing_pool_is_masqueraded_to_outside_all_pools() -> None:
    t, m = nft_mgr()
    m.on_update(pool("10.65.0.0/16", nat=True))
    m.on_update(pool("10.66.0.0/16"))
    m.on_update(pool("10.67.0.0/16", disabled=True))  # disabled pools still count as pools
    m.on_update(pool("10.68.0.0/16", nat=True, disabled=True))  # and still masquerade, as in Calico
    m.complete_deferred_work()
    assert set(t.desired_elements(MASQ) or {}) == {"10.65.0.0/16", "10.68.0.0/16"}
    assert set(t.desired_elements(ALL) or {}) == {"10.65.0.0/16", "10.66.0.0/16", "10.67.0.0/16", "10.68.0.0/16"}
    assert t.desired_rules("nat-cali-nat-outgoing") == (NFT_RULE,)
    assert m.masq_pools == {N("10.65.0.0/16"), N("10.68.0.0/16")}


def test_rule_goes_when_the_last_nat_pool_goes() -> None:
    t, m = nft_mgr()
    m.on_update(pool("10.65.0.0/16", nat=True))
    m.on_update(pool("10.66.0.0/16", nat=True))
    m.complete_deferred_work()
    m.on_update(IPPoolRemove(N("10.65.0.0/16")))
    m.complete_deferred_work()
    assert t.desired_rules("nat-cali-nat-outgoing") == (NFT_RULE,)
    m.on_update(pool("10.66.0.0/16", nat=False))  # natOutgoing switched off
    m.complete_deferred_work()
    assert t.desired_rules("nat-cali-nat-outgoing") == ()
    assert set(t.desired_elements(ALL) or {}) == {"10.66.0.0/16"} and t.desired_elements(MASQ) == {}


def test_other_ip_version_is_ignored_and_v6_uses_v6_names() -> None:
    t, m = nft_mgr()
    m.on_update(pool("fd00:65::/64", nat=True))
    m.complete_deferred_work()
    assert t.desired_elements(MASQ) == {} and t.desired_rules("nat-cali-nat-outgoing") == ()
    t6 = NftTable(family="ip6")
    m6 = MasqManager(t6, ip_version=6)
    m6.on_update(pool("fd00:65::/64", nat=True))
    m6.on_update(pool("10.65.0.0/16", nat=True))
    m6.complete_deferred_work()
    assert set(t6.desired_elements("cali60masq-ipam-pools") or {}) == {"fd00:65::/64"}
    assert t6.desired_rules("nat-cali-nat-outgoing") == (
        "ip6 saddr @cali60masq-ipam-pools ip6 daddr != @cali60all-ipam-pools counter masquerade fully-random",)


def test_iptables_backend_renders_calicos_rules_and_appends_the_hook() -> None:
    dp, m = ipt_mgr()
    m.on_update(pool("10.65.0.0/16", nat=True))
    m.on_update(pool("10.66.0.0/16"))
    m.complete_deferred_work()
    nat = dp.table("nat")
    assert nat.desired_rules("cali-nat-outgoing") == (IPT_RULE,)
    assert nat.desired_rules("cali-POSTROUTING") == ("-j cali-nat-outgoing",)
    assert nat.desired_hooks("POSTROUTING") == ((), ("-j cali-POSTROUTING",))  # appended, not inserted
    assert dp.ipsets is not None
    assert dp.ipsets.desired_members(MASQ) == {"10.65.0.0/16"}
    assert dp.ipsets.desired_members(ALL) == {"10.65.0.0/16", "10.66.0.0/16"}


def test_options_snat_address_port_range_and_interface() -> None:
    opts = NatOptions(snat_address=ipaddress.IPv4Address("192.0.2.10"), port_range=(20000, 30000),
                      out_interface="eth+", random_fully=False)
    t = NftTable()
    m = MasqManager(t, options=opts)
    m.on_update(pool("10.65.0.0/16", nat=True))
    m.complete_deferred_work()
    match = 'ip saddr @cali40masq-ipam-pools ip daddr != @cali40all-ipam-pools oifname "eth*"'
    assert t.desired_rules("nat-cali-nat-outgoing") == (
        f"meta l4proto tcp {match} counter snat to 192.0.2.10:20000-30000",
        f"meta l4proto tcp {match} return",
        f"meta l4proto udp {match} counter snat to 192.0.2.10:20000-30000",
        f"meta l4proto udp {match} return",
        f"{match} counter snat to 192.0.2.10",
    )
    dp = IptablesDataplane([IptablesTable("nat")], IpSets())
    mi = MasqManager(dp, options=NatOptions(port_range=(20000, 30000)))
    mi.on_update(pool("10.65.0.0/16", nat=True))
    mi.complete_deferred_work()
    m_ipt = "-m set --match-set cali40masq-ipam-pools src -m set ! --match-set cali40all-ipam-pools dst"
    assert dp.table("nat").desired_rules("cali-nat-outgoing") == (
        f"-p tcp {m_ipt} -j MASQUERADE --to-ports 20000-30000 --random-fully",
        f"-p tcp {m_ipt} -j RETURN",
        f"-p udp {m_ipt} -j MASQUERADE --to-ports 20000-30000 --random-fully",
        f"-p udp {m_ipt} -j RETURN",
        f"{m_ipt} -j MASQUERADE --random-fully",
    )


def test_tunnel_masquerade_follows_host_tunnel_state() -> None:
    t, m = nft_mgr()
    m.on_update(host(vxlan=True))
    m.complete_deferred_work()
    match = 'oifname "vxlan.calico" fib saddr . oif type != local fib saddr type local'
    assert t.desired_rules("nat-cali-POSTROUTING") == (
        "jump nat-cali-nat-outgoing",
        f"meta l4proto udp {match} masquerade to :4790-65535 fully-random",
        f"{match} masquerade fully-random",
    )
    m.on_update(host(ipip=True))  # IPIP on but no tunnel address yet: nothing
    m.complete_deferred_work()
    assert t.desired_rules("nat-cali-POSTROUTING") == ("jump nat-cali-nat-outgoing",)
    dp, mi = ipt_mgr()
    mi.on_update(host(vxlan=True))
    mi.complete_deferred_work()
    ipt_match = "-o vxlan.calico -m addrtype ! --src-type LOCAL --limit-iface-out -m addrtype --src-type LOCAL"
    assert dp.table("nat").desired_rules("cali-POSTROUTING") == (
        "-j cali-nat-outgoing",
        f"-p udp {ipt_match} -j MASQUERADE --to-ports 4790-65535 --random-fully",
        f"{ipt_match} -j MASQUERADE --random-fully",
    )


def test_repeated_messages_do_not_dirty() -> None:
    _t, m = nft_mgr()
    m.complete_deferred_work()
    m.on_update(pool("10.65.0.0/16", nat=True))
    m.complete_deferred_work()
    m.on_update(pool("10.65.0.0/16", nat=True))
    m.on_update(IPPoolRemove(N("10.99.0.0/16")))  # unknown pool
    assert m._dirty is False


def test_bad_configuration_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="needs IP sets too"):
        MasqManager(IptablesTable("nat"))
    with pytest.raises(ValueError, match="family ip6"):
        MasqManager(NftTable(), ip_version=6)
    with pytest.raises(ValueError, match="IPv4 address"):
        MasqManager(NftTable(), options=NatOptions(snat_address=ipaddress.IPv6Address("fd00::1")))
    with pytest.raises(ValueError, match="port range"):
        MasqManager(NftTable(), options=NatOptions(port_range=(3000, 2000)))
    with pytest.raises(ValueError, match="interface filter"):
        MasqManager(NftTable(), options=NatOptions(out_interface='eth0" accept'))
    with pytest.raises(ValueError, match="nftables or iptables"):
        make_nat_backend("bpf")
    dp, m = make_nat_backend("iptables")
    assert isinstance(dp, IptablesDataplane) and m.ip_version == 4
