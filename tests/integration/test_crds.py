"""deploy/crds against a real kube-apiserver (v1.20) and etcd.

Every CRD must be accepted and become Established with Calico's names and scope; one realistic object
per kind, in the format Calico itself writes, must be accepted and read back unchanged; the schemas of
the kinds the agent writes must reject malformed objects and prune unknown fields, while the read-only
kinds keep their spec verbatim.
"""

from __future__ import annotations

import copy
import glob
import os
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.realparts.etcd import EtcdServer
from tests.realparts.kube_apiserver import ApiError, KubeApiServer, kube_apiserver_missing_reason

_MISSING = kube_apiserver_missing_reason()
pytestmark = [
    pytest.mark.realparts,
    pytest.mark.skipif(_MISSING is not None, reason=f"kube-apiserver unavailable: {_MISSING}"),
]

CRD_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "crds")
GROUP = "crd.projectcalico.org"
NAMESPACE = "felixpy-crd-test"

# plural -> (singular, kind, namespaced): Calico's names (libcalico-go/config/crd).
EXPECTED: dict[str, tuple[str, str, bool]] = {
    "bgpconfigurations": ("bgpconfiguration", "BGPConfiguration", False),
    "bgpfilters": ("bgpfilter", "BGPFilter", False),
    "bgppeers": ("bgppeer", "BGPPeer", False),
    "blockaffinities": ("blockaffinity", "BlockAffinity", False),
    "caliconodestatuses": ("caliconodestatus", "CalicoNodeStatus", False),
    "clusterinformations": ("clusterinformation", "ClusterInformation", False),
    "felixconfigurations": ("felixconfiguration", "FelixConfiguration", False),
    "globalnetworkpolicies": ("globalnetworkpolicy", "GlobalNetworkPolicy", False),
    "globalnetworksets": ("globalnetworkset", "GlobalNetworkSet", False),
    "hostendpoints": ("hostendpoint", "HostEndpoint", False),
    "ipamblocks": ("ipamblock", "IPAMBlock", False),
    "ipamconfigs": ("ipamconfig", "IPAMConfig", False),
    "ipamhandles": ("ipamhandle", "IPAMHandle", False),
    "ippools": ("ippool", "IPPool", False),
    "ipreservations": ("ipreservation", "IPReservation", False),
    "kubecontrollersconfigurations": ("kubecontrollersconfiguration", "KubeControllersConfiguration", False),
    "networkpolicies": ("networkpolicy", "NetworkPolicy", True),
    "networksets": ("networkset", "NetworkSet", True),
    "stagedglobalnetworkpolicies": ("stagedglobalnetworkpolicy", "StagedGlobalNetworkPolicy", False),
    "stagedkubernetesnetworkpolicies": (
        "stagedkubernetesnetworkpolicy",
        "StagedKubernetesNetworkPolicy",
        True,
    ),
    "stagednetworkpolicies": ("stagednetworkpolicy", "StagedNetworkPolicy", True),
    "tiers": ("tier", "Tier", False),
}
# Kinds with a status subresource (status is written through /status only).
WITH_STATUS = {"caliconodestatuses", "ippools", "kubecontrollersconfigurations", "tiers"}
# Kinds the node agent writes: full structural schemas (validated and pruned).
AGENT_WRITTEN = {
    "bgpconfigurations",
    "bgppeers",
    "blockaffinities",
    "clusterinformations",
    "felixconfigurations",
    "ipamblocks",
    "ipamconfigs",
    "ipamhandles",
    "ippools",
}

_BLOCK_ALLOCATIONS: list[int | None] = [0, 1, None, 1] + [None] * 60

# One object per kind, as Calico (v3.30-3.32, KDD mode) writes it. Defaulted fields are given explicitly
# so that "read back unchanged" is exact.
SAMPLES: dict[str, dict[str, Any]] = {
    "ipamblocks": {
        "metadata": {"name": "10-244-1-0-26"},
        "spec": {
            "cidr": "10.244.1.0/26",
            "affinity": "host:node-1",
            "affinityClaimTime": "2026-11-25T08:53:00Z",
            "allocations": _BLOCK_ALLOCATIONS,
            "unallocated": [2, *range(4, 64)],
            "attributes": [
                {
                    "handle_id": "ipip-tunnel-addr-node-1",
                    "secondary": {"node": "node-1", "type": "ipipTunnelAddress"},
                },
                {
                    "handle_id": "k8s-pod-network.8f3c0e6a1b2d4c5e9f7a",
                    "secondary": {
                        "namespace": "default",
                        "node": "node-1",
                        "pod": "web-0",
                        "timestamp": "2026-11-25 08:53:01.123456789 +0000 UTC",
                    },
                },
            ],
            "sequenceNumber": 1795510380123456789,
            "sequenceNumberForAllocation": {"0": 1795510380123456789, "1": 1795510380123456790},
            "deleted": False,
            "strictAffinity": False,
        },
    },
    "blockaffinities": {
        "metadata": {
            "name": "node-1-10-244-1-0-26",
            "labels": {
                "projectcalico.org/affinity-type": "host",
                "projectcalico.org/hostname-hash": "QMCSXYZ6L2N3TQ4VE7FJQZ7YH5HSG5Y3VJ4QXKZ2C6QX5N3M4PA",
                "projectcalico.org/ip-version": "4",
            },
        },
        "spec": {
            "state": "confirmed",
            "node": "node-1",
            "cidr": "10.244.1.0/26",
            "type": "host",
            "deleted": "false",
        },
    },
    "ipamhandles": {
        "metadata": {"name": "k8s-pod-network.8f3c0e6a1b2d4c5e9f7a"},
        "spec": {
            "handleID": "k8s-pod-network.8f3c0e6a1b2d4c5e9f7a",
            "block": {"10.244.1.0/26": 1},
            "deleted": False,
        },
    },
    "ipamconfigs": {
        "metadata": {"name": "default"},
        "spec": {"strictAffinity": False, "autoAllocateBlocks": True, "maxBlocksPerHost": 0},
    },
    "ippools": {
        "metadata": {
            "name": "default-ipv4-ippool",
            "annotations": {"projectcalico.org/metadata": '{"creationTimestamp":null}'},
        },
        "spec": {
            "cidr": "10.244.0.0/16",
            "blockSize": 26,
            "ipipMode": "Never",
            "vxlanMode": "CrossSubnet",
            "natOutgoing": True,
            "nodeSelector": "all()",
            "allowedUses": ["Workload", "Tunnel"],
            "assignmentMode": "Automatic",
        },
    },
    "clusterinformations": {
        "metadata": {"name": "default"},
        "spec": {
            "clusterGUID": "5c3b9f0d2e8a4f6b9d1c7e2a3b4c5d6e",
            "clusterType": "k8s,bgp,kubeadm,kdd",
            "calicoVersion": "v3.30.3",
            "datastoreReady": True,
        },
    },
    "felixconfigurations": {
        "metadata": {"name": "default"},
        "spec": {
            "bpfEnabled": False,
            "bpfLogLevel": "Off",
            "floatingIPs": "Disabled",
            "healthPort": 9099,
            "logSeverityScreen": "Info",
            "reportingInterval": "0s",
            "iptablesRefreshInterval": "1m30s",
            "vxlanVNI": 4096,
            "vxlanPort": 4789,
            "natPortRange": "32768:65535",
            "kubeNodePortRanges": ["30000:32767", 31000],
            "failsafeInboundHostPorts": [{"protocol": "tcp", "port": 22}, {"protocol": "udp", "port": 68}],
            "routeTableRanges": [{"min": 1, "max": 250}],
            "iptablesMarkMask": 4294901760,
            "nftablesMode": "Auto",
            "bpfLogFilters": {"all": "tcp"},
            "healthTimeoutOverrides": [{"name": "InternalDataplaneMainLoop", "timeout": "90s"}],
        },
    },
    "bgpconfigurations": {
        "metadata": {"name": "default"},
        "spec": {
            "logSeverityScreen": "Info",
            "nodeToNodeMeshEnabled": False,
            "asNumber": 4200000001,
            "listenPort": 179,
            "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}],
            "serviceLoadBalancerAggregation": "Enabled",
            "communities": [{"name": "bgp-large-community", "value": "63400:300:100"}],
            "prefixAdvertisements": [{"cidr": "10.244.0.0/16", "communities": ["bgp-large-community", "65001:10"]}],
            "nodeMeshPassword": {"secretKeyRef": {"name": "bgp-secrets", "key": "mesh"}},
            "ignoredInterfaces": ["eth9"],
        },
    },
    "bgppeers": {
        "metadata": {"name": "peer-with-route-reflectors"},
        "spec": {
            "nodeSelector": "all()",
            "peerSelector": "route-reflector == 'true'",
            "asNumber": 64512,
            "keepOriginalNextHop": True,
            "maxRestartTime": "120s",
            "password": {"secretKeyRef": {"name": "bgp-secrets", "key": "rr"}},
            "sourceAddress": "UseNodeIP",
            "filters": ["export-only-pools"],
        },
    },
    "globalnetworkpolicies": {
        "metadata": {"name": "default.allow-dns"},
        "spec": {
            "tier": "default",
            "order": 100,
            "selector": "all()",
            "namespaceSelector": "has(projectcalico.org/name)",
            "types": ["Egress"],
            "egress": [
                {
                    "action": "Allow",
                    "protocol": "UDP",
                    "destination": {"selector": "k8s-app == 'kube-dns'", "ports": [53]},
                }
            ],
        },
    },
    "stagedglobalnetworkpolicies": {
        "metadata": {"name": "default.deny-all"},
        "spec": {"tier": "default", "order": 2000, "selector": "all()", "types": ["Ingress", "Egress"]},
    },
    "networkpolicies": {
        "metadata": {"name": "default.allow-web", "namespace": NAMESPACE},
        "spec": {
            "tier": "default",
            "order": 1000,
            "selector": "app == 'web'",
            "types": ["Ingress"],
            "ingress": [
                {
                    "action": "Allow",
                    "protocol": "TCP",
                    "source": {"selector": "app == 'client'"},
                    "destination": {"ports": [80, "http-alt", "8000:8080"]},
                }
            ],
        },
    },
    "stagednetworkpolicies": {
        "metadata": {"name": "default.staged-web", "namespace": NAMESPACE},
        "spec": {"tier": "default", "selector": "app == 'web'", "types": ["Ingress"], "stagedAction": "Set"},
    },
    "stagedkubernetesnetworkpolicies": {
        "metadata": {"name": "staged-knp", "namespace": NAMESPACE},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"], "ingress": [{}]},
    },
    "networksets": {
        "metadata": {
            "name": "external-db",
            "namespace": NAMESPACE,
            "labels": {"projectcalico.org/kind": "db"},
            "annotations": {"projectcalico.org/metadata": '{"labels":{"role":"db"}}'},
        },
        "spec": {"nets": ["198.51.100.0/28", "2001:db8::/64"]},
    },
    "globalnetworksets": {
        "metadata": {"name": "blocklist"},
        "spec": {"nets": ["203.0.113.0/24"], "allowedEgressDomains": ["example.com"]},
    },
    "hostendpoints": {
        "metadata": {"name": "node-1-eth0"},
        "spec": {
            "node": "node-1",
            "interfaceName": "eth0",
            "expectedIPs": ["192.0.2.10"],
            "profiles": ["projectcalico-default-allow"],
            "ports": [{"name": "ssh", "port": 22, "protocol": "TCP"}],
        },
    },
    "ipreservations": {
        "metadata": {"name": "reserved-gateways"},
        "spec": {"reservedCIDRs": ["10.244.0.1/32", "10.244.255.0/24"]},
    },
    "tiers": {"metadata": {"name": "security"}, "spec": {"order": 100, "defaultAction": "Deny"}},
    "kubecontrollersconfigurations": {
        "metadata": {"name": "default"},
        "spec": {
            "healthChecks": "Enabled",
            "logSeverityScreen": "Info",
            "etcdV3CompactionPeriod": "10m0s",
            "controllers": {
                "node": {"reconcilerPeriod": "5m0s", "syncLabels": "Enabled", "leakGracePeriod": "15m0s"},
                "policy": {"reconcilerPeriod": "5m0s"},
            },
        },
    },
    "caliconodestatuses": {
        "metadata": {"name": "node-1-status"},
        "spec": {"node": "node-1", "classes": ["Agent", "BGP", "Routes"], "updatePeriodSeconds": 10},
    },
    "bgpfilters": {
        "metadata": {"name": "export-only-pools"},
        "spec": {
            "exportV4": [
                {"action": "Accept", "matchOperator": "In", "cidr": "10.244.0.0/16"},
                {"action": "Reject"},
            ]
        },
    },
}

STATUS_SAMPLES: dict[str, dict[str, Any]] = {
    "ippools": {
        "conditions": [
            {
                "type": "Allocatable",
                "status": "True",
                "reason": "PoolEnabled",
                "message": "IP pool is enabled",
                "lastTransitionTime": "2026-11-25T08:53:00Z",
                "observedGeneration": 1,
            }
        ]
    },
    "caliconodestatuses": {
        "lastUpdated": "2026-11-25T08:53:10Z",
        "agent": {"birdV4": {"state": "Ready", "version": "v0.3.3", "routerID": "192.0.2.10"}},
        "bgp": {"numberEstablishedV4": 1, "numberNotEstablishedV4": 0, "peersV4": []},
    },
    "kubecontrollersconfigurations": {"runningConfig": {"healthChecks": "Enabled"}, "environmentVars": {}},
    "tiers": {"conditions": []},
}


def _path(plural: str, name: str | None = None) -> str:
    ns = f"/namespaces/{NAMESPACE}" if EXPECTED[plural][2] else ""
    base = f"/apis/{GROUP}/v1{ns}/{plural}"
    return f"{base}/{name}" if name else base


def _obj(plural: str, sample: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(sample)
    obj["apiVersion"] = f"{GROUP}/v1"
    obj["kind"] = EXPECTED[plural][1]
    return obj


@pytest.fixture(scope="module")
def kas() -> Iterator[KubeApiServer]:
    with EtcdServer(name_prefix="felixpy-crdtest") as etcd, KubeApiServer(etcd) as server:
        server.apply_crds(CRD_DIR)
        server.ensure_namespace(NAMESPACE, with_default_sa=False)
        yield server


def test_every_crd_file_is_listed_in_kustomization() -> None:
    with open(os.path.join(CRD_DIR, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CRD_DIR, "crd.projectcalico.org_*.yaml")))
    assert sorted(kustomization["resources"]) == files
    assert files == sorted(f"{GROUP}_{plural}.yaml" for plural in EXPECTED)


def test_crds_are_established_with_calicos_names(kas: KubeApiServer) -> None:
    crds = kas.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]
    ours = {c["spec"]["names"]["plural"]: c for c in crds if c["spec"]["group"] == GROUP}
    assert set(ours) == set(EXPECTED)
    for plural, (singular, kind, namespaced) in EXPECTED.items():
        spec = ours[plural]["spec"]
        assert ours[plural]["metadata"]["name"] == f"{plural}.{GROUP}"
        assert spec["names"]["singular"] == singular
        assert spec["names"]["kind"] == kind
        assert spec["names"]["listKind"] == kind + "List"
        assert spec["scope"] == ("Namespaced" if namespaced else "Cluster")
        [version] = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
        assert ("status" in (version.get("subresources") or {})) == (plural in WITH_STATUS)
        conditions = {c["type"]: c["status"] for c in ours[plural]["status"]["conditions"]}
        assert conditions.get("Established") == "True", (plural, conditions)
        assert conditions.get("NonStructuralSchema") in (None, "False"), (plural, conditions)
    # Discovery serves every kind at crd.projectcalico.org/v1.
    discovery = kas.request("GET", f"/apis/{GROUP}/v1")
    served = {r["name"]: r for r in discovery["resources"] if "/" not in r["name"]}
    assert set(served) == set(EXPECTED)
    for plural, (_, kind, namespaced) in EXPECTED.items():
        assert served[plural]["kind"] == kind
        assert served[plural]["namespaced"] is namespaced


@pytest.mark.parametrize("plural", sorted(SAMPLES))
def test_sample_object_round_trips_unchanged(kas: KubeApiServer, plural: str) -> None:
    obj = _obj(plural, SAMPLES[plural])
    name = obj["metadata"]["name"]
    created = kas.request("POST", _path(plural), obj)
    try:
        fetched = kas.request("GET", _path(plural, name))
        for got in (created, fetched):
            assert got["spec"] == obj["spec"], plural
            for field in ("labels", "annotations"):
                assert got["metadata"].get(field) == obj["metadata"].get(field), (plural, field)
        listed = kas.request("GET", _path(plural))["items"]
        assert [i["spec"] for i in listed if i["metadata"]["name"] == name] == [obj["spec"]]
        if plural in STATUS_SAMPLES:
            fetched["status"] = STATUS_SAMPLES[plural]
            kas.request("PUT", _path(plural, name) + "/status", fetched)
            again = kas.request("GET", _path(plural, name))
            assert again["status"] == STATUS_SAMPLES[plural]
            assert again["spec"] == obj["spec"]
    finally:
        kas.request("DELETE", _path(plural, name))


def test_ipam_block_null_allocations_survive_update(kas: KubeApiServer) -> None:
    obj = _obj("ipamblocks", SAMPLES["ipamblocks"])
    obj["metadata"]["name"] = "10-244-2-0-26"
    obj["spec"]["cidr"] = "10.244.2.0/26"
    created = kas.request("POST", _path("ipamblocks"), obj)
    try:
        # Release ordinal 0 the way Calico does: null it, append it to the free list, bump the sequence.
        created["spec"]["allocations"][0] = None
        created["spec"]["unallocated"].append(0)
        created["spec"]["sequenceNumber"] += 1
        created["spec"]["affinity"] = None
        updated = kas.request("PUT", _path("ipamblocks", "10-244-2-0-26"), created)
        assert updated["spec"]["allocations"][:4] == [None, 1, None, 1]
        assert updated["spec"]["unallocated"][-1] == 0
        assert updated["spec"].get("affinity") is None
        # A write with a stale resourceVersion is a conflict: the compare-and-swap IPAM relies on.
        with pytest.raises(ApiError) as info:
            kas.request("PUT", _path("ipamblocks", "10-244-2-0-26"), created)
        assert info.value.status == 409
    finally:
        kas.request("DELETE", _path("ipamblocks", "10-244-2-0-26"))


# (plural, change to the sample's spec, text the API server's error must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("ipamblocks", {"allocations": None}, "spec.allocations"),
    ("ipamblocks", {"strictAffinity": None}, "spec.strictAffinity"),
    ("ipamblocks", {"allocations": ["0"]}, "spec.allocations"),
    ("ipamblocks", {"sequenceNumberForAllocation": {"0": "seven"}}, "sequenceNumberForAllocation"),
    ("ipamblocks", {"affinityClaimTime": "yesterday"}, "spec.affinityClaimTime"),
    ("blockaffinities", {"deleted": False}, "spec.deleted"),
    ("blockaffinities", {"state": None}, "spec.state"),
    ("ipamhandles", {"block": {"10.244.1.0/26": "one"}}, "spec.block"),
    ("ipamhandles", {"handleID": None}, "spec.handleID"),
    ("ipamconfigs", {"maxBlocksPerHost": -1}, "spec.maxBlocksPerHost"),
    ("ipamconfigs", {"autoAllocateBlocks": None}, "spec.autoAllocateBlocks"),
    ("ippools", {"ipipMode": "Sometimes"}, "spec.ipipMode"),
    ("ippools", {"blockSize": 129}, "spec.blockSize"),
    ("ippools", {"allowedUses": ["Workload", "Workload"]}, "spec.allowedUses"),
    ("ippools", {"cidr": None}, "spec.cidr"),
    ("ippools", {"cidr": "10.244.0.0/33"}, "spec.cidr"),
    ("bgpconfigurations", {"serviceClusterIPs": [{"cidr": "10.96.0.0"}]}, "cidr"),
    ("clusterinformations", {"datastoreReady": "yes"}, "spec.datastoreReady"),
    ("felixconfigurations", {"reportingInterval": "10 seconds"}, "spec.reportingInterval"),
    ("felixconfigurations", {"logSeverityScreen": "Loud"}, "spec.logSeverityScreen"),
    ("felixconfigurations", {"routeTableRange": {"min": 1}}, "spec.routeTableRange.max"),
    ("bgpconfigurations", {"listenPort": 0}, "spec.listenPort"),
    ("bgpconfigurations", {"communities": [{"name": "x", "value": "not-a-community"}]}, "value"),
    ("bgppeers", {"asNumber": 4294967296}, "spec.asNumber"),
    ("bgppeers", {"password": {"secretKeyRef": {"name": "s"}}}, "key"),
]


@pytest.mark.parametrize(("plural", "change", "expect"), INVALID)
def test_agent_written_kinds_reject_malformed_objects(
    kas: KubeApiServer, plural: str, change: dict[str, Any], expect: str
) -> None:
    obj = _obj(plural, SAMPLES[plural])
    for key, value in change.items():
        if value is None:
            del obj["spec"][key]
        else:
            obj["spec"][key] = value
    with pytest.raises(ApiError) as info:
        created = kas.request("POST", _path(plural), obj)
        kas.request("DELETE", _path(plural, created["metadata"]["name"]))
    assert info.value.status == 422, info.value.body
    assert expect in info.value.body["message"], info.value.body["message"]


@pytest.mark.parametrize("plural", sorted(AGENT_WRITTEN))
def test_agent_written_kinds_prune_unknown_fields(kas: KubeApiServer, plural: str) -> None:
    obj = _obj(plural, SAMPLES[plural])
    obj["spec"]["notACalicoField"] = {"x": 1}
    created = kas.request("POST", _path(plural), obj)
    try:
        assert "notACalicoField" not in created["spec"]
        del obj["spec"]["notACalicoField"]
        assert created["spec"] == obj["spec"]
    finally:
        kas.request("DELETE", _path(plural, obj["metadata"]["name"]))


@pytest.mark.parametrize("plural", sorted(set(EXPECTED) - AGENT_WRITTEN))
def test_read_only_kinds_keep_spec_verbatim(kas: KubeApiServer, plural: str) -> None:
    obj = _obj(plural, SAMPLES[plural])
    obj["spec"]["futureField"] = {"nested": [1, "two", {"three": True}]}
    created = kas.request("POST", _path(plural), obj)
    try:
        assert created["spec"] == obj["spec"]
    finally:
        kas.request("DELETE", _path(plural, obj["metadata"]["name"]))


def test_defaults_match_calico(kas: KubeApiServer) -> None:
    """Fields Calico's CRDs default are defaulted the same way when a writer leaves them out."""
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("ippools", {"cidr": "10.250.0.0/24"}, {"assignmentMode": "Automatic"}),
        ("bgpconfigurations", {}, {"logSeverityScreen": "Info", "serviceLoadBalancerAggregation": "Enabled"}),
        ("felixconfigurations", {}, {"nftablesMode": "Auto"}),
        ("ipamblocks", {**SAMPLES["ipamblocks"]["spec"], "sequenceNumber": None}, {"sequenceNumber": 0}),
    ]
    for plural, given, defaults in cases:
        spec = {k: v for k, v in given.items() if v is not None}
        obj = _obj(plural, {"metadata": {"name": "defaults-test"}, "spec": spec})
        created = kas.request("POST", _path(plural), obj)
        try:
            for key, value in defaults.items():
                assert created["spec"][key] == value, (plural, key)
        finally:
            kas.request("DELETE", _path(plural, "defaults-test"))


# The signature of a defect in kube-apiserver builds made with Go >= 1.18: kube-openapi's type check
# compares reflect.Values, which now treats "" as null, so a typed string field cannot be empty.
_EMPTY_STRING_DEFECT = 'Invalid value: "null"'


def test_empty_strings_in_typed_fields_are_kept(kas: KubeApiServer) -> None:
    """Calico writes empty strings (e.g. ClusterInformation.variant, attribute values, condition messages)."""
    cases = [
        ("clusterinformations", {"clusterGUID": "x", "variant": "", "datastoreReady": False}),
        (
            "ipamblocks",
            {**SAMPLES["ipamblocks"]["spec"], "attributes": [{"handle_id": "h", "secondary": {"k": ""}}]},
        ),
        ("felixconfigurations", {"bpfLogLevel": "", "interfaceExclude": "", "nftablesMode": "Auto"}),
    ]
    for plural, spec in cases:
        obj = _obj(plural, {"metadata": {"name": "empty-strings"}, "spec": spec})
        try:
            created = kas.request("POST", _path(plural), obj)
        except ApiError as e:
            message = str(e.body.get("message", "")) if isinstance(e.body, dict) else str(e.body)
            if e.status == 422 and _EMPTY_STRING_DEFECT in message:
                pytest.skip(
                    "this kube-apiserver build rejects empty strings in typed CRD fields (Go >= 1.18 "
                    "defect in vendored kube-openapi validate/type.go; build it with the condition "
                    f"reduced to `data == nil`): {message}"
                )
            raise
        try:
            assert created["spec"] == spec, plural
        finally:
            kas.request("DELETE", _path(plural, "empty-strings"))
