"""Unit tests of the pure datastore conversions (Calico's KDD and etcd v3 data model)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from felixpy import names
from felixpy.datastore import conversion as cv
from felixpy.datastore.api import Key

# --- UIDs and hashes (golden values from Calico's own tests) ----------------------------------------


def test_convert_uid_matches_calico_golden_value_and_is_an_involution() -> None:
    original = "30316465-6365-4463-ad63-3564622d3638"
    converted = cv.convert_uid(original)
    assert converted == "0c8c26a6-c6a6-44c6-adc6-ac2646b46c1c"
    assert converted[14] == "4"  # the version nibble survives
    assert cv.convert_uid(converted) == original


def test_convert_uid_rejects_garbage() -> None:
    with pytest.raises(cv.ConversionError):
        cv.convert_uid("not-a-uid")


def test_hostname_hash_golden() -> None:
    assert cv.hostname_hash("node-a") == "PY3TQE2E3XMTETLM2MJO3UITKPFB27YUJ4T4E5XGPEJON3SM4QAA"


# --- CIDR and BlockAffinity names ---------------------------------------------------------------------


@pytest.mark.parametrize(("cidr", "name"), [
    ("10.244.1.0/26", "10-244-1-0-26"),
    ("fd00:10:244::/122", "fd00-10-244---122"),
    ("10.244.1.5/26", "10-244-1-0-26"),  # masked like Go's IPNet.String()
])
def test_cidr_names(cidr: str, name: str) -> None:
    assert cv.cidr_to_name(cidr) == name
    back = cv.name_to_cidr(name)
    assert back is not None and cv.cidr_to_name(back) == name


def test_name_to_cidr_rejects_non_cidr_names() -> None:
    assert cv.name_to_cidr("default") is None
    assert cv.name_to_cidr("10-244-1-0") is None
    assert cv.name_to_cidr("10-244-1-300-26") is None


def test_block_affinity_name_and_candidates() -> None:
    name = cv.block_affinity_name("node-1", "10.244.1.0/26")
    assert name == "node-1-10-244-1-0-26"
    assert cv.block_affinity_name_candidates(name) == [("node-1", "10.244.1.0/26")]
    v6 = cv.block_affinity_name("n", "fd00:10:244::/122")
    assert ("n", "fd00:10:244::/122") in cv.block_affinity_name_candidates(v6)


def test_block_affinity_long_name_is_hashed_like_calico() -> None:
    host = "h" * 250
    name = cv.block_affinity_name(host, "10.244.1.0/26")
    assert len(name) < 253 + 12
    assert name.startswith("h" * (252 - len("10-244-1-0-26") - 13) + "-10-244-1-0-26-")
    assert cv.block_affinity_name_candidates(name) == []


# --- CRs <-> v3 -------------------------------------------------------------------------------------


def _cr(kind: str, name: str, meta: Any, **extra_md: Any) -> dict[str, Any]:
    md: dict[str, Any] = {"name": name, "resourceVersion": "42", "uid": "30316465-6365-4463-ad63-3564622d3638",
                          "creationTimestamp": "2024-01-02T03:04:05Z", **extra_md}
    if meta is not None:
        md.setdefault("annotations", {})[cv.METADATA_ANNOTATION] = meta if isinstance(meta, str) else json.dumps(meta)
    return {"apiVersion": cv.CRD_API_VERSION, "kind": kind, "metadata": md, "spec": {"cidr": "10.0.0.0/16"}}


def test_cr_to_resource_reads_metadata_annotation_and_merges_labels() -> None:
    cr = _cr("IPPool", "pool1", {"labels": {"env": "prod"}, "annotations": {"note": "x"},
                                 "creationTimestamp": "2020-01-01T00:00:00Z"},
             labels={"projectcalico.org/x": "1"}, annotations={"projectcalico.org/keep": "y"})
    res = cv.cr_to_resource(cr)
    md = res["metadata"]
    assert res["apiVersion"] == "projectcalico.org/v3" and res["kind"] == "IPPool"
    assert md["name"] == "pool1"
    assert md["resourceVersion"] == "42"
    assert md["uid"] == "0c8c26a6-c6a6-44c6-adc6-ac2646b46c1c"
    assert md["creationTimestamp"] == "2020-01-01T00:00:00Z"  # the annotation's wins
    assert md["labels"] == {"projectcalico.org/x": "1", "env": "prod"}
    assert md["annotations"] == {"projectcalico.org/keep": "y", "note": "x"}
    assert res["spec"] == {"cidr": "10.0.0.0/16"}


def test_cr_without_metadata_annotation_uses_cr_metadata() -> None:
    res = cv.cr_to_resource(_cr("IPPool", "p", None))
    assert res["metadata"]["creationTimestamp"] == "2024-01-02T03:04:05Z"
    assert "labels" not in res["metadata"]


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '"a string"'])
def test_cr_with_malformed_metadata_annotation_raises(bad: str) -> None:
    with pytest.raises(cv.ConversionError, match=r"projectcalico\.org/metadata"):
        cv.cr_to_resource(_cr("IPPool", "p", bad))


def test_resource_to_cr_keeps_only_our_labels_on_the_cr_and_round_trips() -> None:
    res: dict[str, Any] = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet",
           "metadata": {"name": "gns", "labels": {"role": "db", "projectcalico.org/x": "1"},
                        "annotations": {"a": "b", "projectcalico.org/c": "d"},
                        "uid": "0c8c26a6-c6a6-44c6-adc6-ac2646b46c1c", "resourceVersion": "7"},
           "spec": {"nets": ["10.0.0.0/8"]}}
    cr = cv.resource_to_cr(res, resource_version="7")
    assert cr["apiVersion"] == "crd.projectcalico.org/v1"
    assert cr["metadata"]["labels"] == {"projectcalico.org/x": "1"}
    assert cr["metadata"]["resourceVersion"] == "7"
    assert cr["metadata"]["uid"] == "30316465-6365-4463-ad63-3564622d3638"
    stored = json.loads(cr["metadata"]["annotations"][cv.METADATA_ANNOTATION])
    assert "name" not in stored and "uid" not in stored and "resourceVersion" not in stored
    assert stored["labels"] == {"role": "db", "projectcalico.org/x": "1"}
    assert cr["metadata"]["annotations"]["projectcalico.org/c"] == "d"
    assert "a" not in cr["metadata"]["annotations"]
    back = cv.cr_to_resource(cr)
    assert back["metadata"]["labels"] == res["metadata"]["labels"]
    assert back["metadata"]["annotations"] == res["metadata"]["annotations"]
    assert back["metadata"]["uid"] == res["metadata"]["uid"]
    assert back["spec"] == res["spec"]


def test_policy_names_keep_name_in_annotation_and_strip_default_prefix() -> None:
    res = {"kind": "GlobalNetworkPolicy", "metadata": {"name": "allow-dns"}, "spec": {"tier": "default"}}
    cr = cv.resource_to_cr(res)
    assert json.loads(cr["metadata"]["annotations"][cv.METADATA_ANNOTATION])["name"] == "allow-dns"
    old = {"kind": "GlobalNetworkPolicy", "metadata": {"name": "default.allow-dns"}, "spec": {}}
    assert cv.cr_to_resource(old)["metadata"]["name"] == "allow-dns"
    tiered = {"kind": "GlobalNetworkPolicy", "metadata": {"name": "sec.allow-dns"}, "spec": {"tier": "sec"}}
    assert cv.cr_to_resource(tiered)["metadata"]["name"] == "sec.allow-dns"


def test_namespaced_cr_requires_namespace() -> None:
    with pytest.raises(ValueError, match="namespace"):
        cv.resource_to_cr({"kind": "NetworkPolicy", "metadata": {"name": "x"}, "spec": {}})
    cr = cv.resource_to_cr({"kind": "NetworkPolicy", "metadata": {"name": "x", "namespace": "ns1"}, "spec": {}})
    assert cr["metadata"]["namespace"] == "ns1"


def test_block_affinity_deleted_is_a_string_in_the_cr_and_labels_are_set() -> None:
    res = {"kind": "BlockAffinity", "metadata": {"name": "node-a-10-244-1-0-26"},
           "spec": {"node": "node-a", "cidr": "10.244.1.0/26", "state": "confirmed", "deleted": False}}
    cr = cv.resource_to_cr(res)
    assert cr["spec"]["deleted"] == "false"
    assert cr["metadata"]["labels"] == {
        cv.LABEL_HOSTNAME_HASH: "PY3TQE2E3XMTETLM2MJO3UITKPFB27YUJ4T4E5XGPEJON3SM4QAA",
        cv.LABEL_AFFINITY_TYPE: "host", cv.LABEL_IP_VERSION: "4"}
    assert cv.cr_to_resource(cr)["spec"]["deleted"] is False
    cr["spec"]["deleted"] = "maybe"
    with pytest.raises(cv.ConversionError):
        cv.cr_to_resource(cr)


def test_owner_references_are_translated_both_ways() -> None:
    uid = "30316465-6365-4463-ad63-3564622d3638"
    res: dict[str, Any] = {"kind": "IPPool", "metadata": {"name": "p", "ownerReferences": [
        {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "name": "o", "uid": uid},
        {"apiVersion": "v1", "kind": "Pod", "name": "q", "uid": uid}]}, "spec": {}}
    cr = cv.resource_to_cr(res)
    stored = json.loads(cr["metadata"]["annotations"][cv.METADATA_ANNOTATION])
    assert stored["ownerReferences"][0]["apiVersion"] == "crd.projectcalico.org/v1"
    assert stored["ownerReferences"][0]["uid"] == cv.convert_uid(uid)
    assert stored["ownerReferences"][1]["uid"] == uid
    back = cv.cr_to_resource(cr)
    assert back["metadata"]["ownerReferences"] == res["metadata"]["ownerReferences"]


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError):
        cv.resource_to_cr({"kind": "Bogus", "metadata": {"name": "x"}})


# --- WorkloadEndpoint names and Pods ---------------------------------------------------------------


def test_parse_wep_name() -> None:
    ids = cv.parse_wep_name("node--1-k8s-web--0-eth0")
    assert (ids.node, ids.orchestrator, ids.pod, ids.endpoint) == ("node-1", "k8s", "web-0", "eth0")
    assert cv.parse_wep_name(names.wep_name("a-b-c", "k8s", "x--y", "eth0")).pod == "x--y"
    cni = cv.parse_wep_name("host-cni-abcdef-eth0")
    assert cni.container_id == "abcdef" and cni.endpoint == "eth0"
    with pytest.raises(ValueError):
        cv.parse_wep_name("a-k8s-b-c-d")
    with pytest.raises(ValueError):
        cv.parse_wep_name("")


def _pod(**over: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "metadata": {"name": "web-0", "namespace": "shop", "uid": "u-1", "resourceVersion": "100",
                     "creationTimestamp": "2024-01-01T00:00:00Z", "labels": {"app": "web"},
                     "generateName": "web-", "annotations": {}},
        "spec": {"nodeName": "node-1", "serviceAccountName": "web-sa",
                 "containers": [{"name": "c", "ports": [
                     {"name": "http", "containerPort": 80, "protocol": "TCP"},
                     {"containerPort": 81},  # no name, no hostPort: not a named port
                     {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "1.2.3.4"},
                     {"name": "weird", "containerPort": 9, "protocol": "QUIC"}]}],
                 "initContainers": [{"name": "i", "ports": [{"name": "sctp", "containerPort": 7,
                                                             "protocol": "SCTP"}]}]},
        "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"},
                                                                         {"ip": "fd00::5"}]},
    }
    for k, v in over.items():
        section, _, field = k.partition("__")
        if v is None:
            pod[section].pop(field, None)
        else:
            pod[section][field] = v
    return pod


def test_pod_to_wep_follows_calico_rules() -> None:
    wep = cv.pod_to_wep(_pod())
    md, spec = wep["metadata"], wep["spec"]
    assert wep["kind"] == "WorkloadEndpoint"
    assert md["name"] == "node--1-k8s-web--0-eth0"
    assert md["namespace"] == "shop"
    assert md["uid"] == "u-1" and md["resourceVersion"] == "100" and md["generateName"] == "web-"
    assert md["labels"] == {"app": "web", "projectcalico.org/namespace": "shop",
                            "projectcalico.org/orchestrator": "k8s", "projectcalico.org/serviceaccount": "web-sa"}
    assert spec["interfaceName"] == names.veth_name_for_workload("shop", "web-0")
    assert spec["profiles"] == ["kns.shop", "ksa.shop.web-sa"]
    assert spec["ipNetworks"] == ["10.244.1.5/32", "fd00::5/128"]
    assert spec["node"] == "node-1" and spec["pod"] == "web-0" and spec["endpoint"] == "eth0"
    assert spec["orchestrator"] == "k8s" and spec["serviceAccountName"] == "web-sa"
    assert spec["ports"] == [
        {"name": "http", "protocol": "tcp", "port": 80, "hostPort": 0, "hostIP": ""},
        {"name": "", "protocol": "udp", "port": 53, "hostPort": 5353, "hostIP": "1.2.3.4"},
        {"name": "sctp", "protocol": "sctp", "port": 7, "hostPort": 0, "hostIP": ""},
    ]
    assert "containerID" not in spec


def test_pod_ip_sources_in_calico_order() -> None:
    p = _pod(status__podIPs=None)
    assert cv.pod_ip_networks(p) == ["10.244.1.5/32"]
    p = _pod(status__podIPs=None, status__podIP=None,
             metadata__annotations={cv.ANNOTATION_POD_IPS: "10.0.0.1/32,fd00::1/128",
                                    cv.ANNOTATION_POD_IP: "10.9.9.9/32"})
    assert cv.pod_ip_networks(p) == ["10.0.0.1/32", "fd00::1/128"]
    p = _pod(status__podIPs=None, status__podIP=None, metadata__annotations={cv.ANNOTATION_POD_IP: "10.9.9.9/32"})
    assert cv.pod_ip_networks(p) == ["10.9.9.9/32"]
    p = _pod(status__podIPs=None, status__podIP=None, metadata__annotations={cv.ANNOTATION_AWS_POD_IPS: "10.1.1.1"})
    assert cv.pod_ip_networks(p) == ["10.1.1.1/32"]
    p = _pod(status__podIPs=None, status__podIP=None)
    assert cv.pod_ip_networks(p) == []


def test_pod_with_bad_ip_is_a_conversion_error() -> None:
    with pytest.raises(cv.ConversionError, match="bad pod IP"):
        cv.pod_to_wep(_pod(status__podIPs=[{"ip": "10.0.0.999"}]))


def test_finished_pod_has_no_ips() -> None:
    assert cv.pod_to_wep(_pod(status__phase="Succeeded"))["spec"]["ipNetworks"] == []
    deleting = _pod(metadata__deletionTimestamp="2024-01-01T00:00:00Z",
                    metadata__annotations={cv.ANNOTATION_POD_IP: ""})
    assert cv.pod_is_finished(deleting)
    assert cv.pod_to_wep(deleting)["spec"]["ipNetworks"] == []
    still_up = _pod(metadata__deletionTimestamp="2024-01-01T00:00:00Z")
    assert not cv.pod_is_finished(still_up)


def test_pod_validity() -> None:
    assert cv.pod_is_valid_wep(_pod())
    assert not cv.pod_is_valid_wep(_pod(spec__hostNetwork=True))
    assert not cv.pod_is_valid_wep(_pod(spec__nodeName=None))


def test_pod_annotations_container_id_floating_ips_and_source_prefixes() -> None:
    pod = _pod(metadata__annotations={
        cv.ANNOTATION_CONTAINER_ID: "abc123",
        cv.ANNOTATION_FLOATING_IPS: '["1.1.1.1", "2001:db8::1"]',
        cv.ANNOTATION_ALLOWED_SOURCE_PREFIXES: '["192.168.1.7/24"]',
        cv.ANNOTATION_NETWORK_STATUS: "[]",
    })
    wep = cv.pod_to_wep(pod, interface_prefix="tap")
    spec = wep["spec"]
    assert spec["containerID"] == "abc123"
    assert spec["ipNATs"] == [{"internalIP": "10.244.1.5", "externalIP": "1.1.1.1"},
                              {"internalIP": "fd00::5", "externalIP": "2001:db8::1"}]
    assert spec["allowSpoofedSourcePrefixes"] == ["192.168.1.0/24"]
    assert spec["interfaceName"].startswith("tap") and len(spec["interfaceName"]) == 14
    assert wep["metadata"]["annotations"] == {cv.ANNOTATION_NETWORK_STATUS: "[]"}
    with pytest.raises(cv.ConversionError, match="floatingIPs"):
        cv.pod_to_wep(_pod(metadata__annotations={cv.ANNOTATION_FLOATING_IPS: "nope"}))


def test_long_service_account_has_no_label() -> None:
    wep = cv.pod_to_wep(_pod(spec__serviceAccountName="s" * 63))
    assert "projectcalico.org/serviceaccount" not in wep["metadata"]["labels"]
    assert wep["spec"]["profiles"][1] == "ksa.shop." + "s" * 63


def test_wep_pod_patches() -> None:
    wep = {"spec": {"ipNetworks": ["10.244.1.5/32", "fd00::5/128"], "containerID": "cid"}}
    assert cv.wep_pod_patch(wep, resource_version="9", uid="u") == {"metadata": {
        "annotations": {cv.ANNOTATION_POD_IP: "10.244.1.5/32", cv.ANNOTATION_POD_IPS: "10.244.1.5/32,fd00::5/128",
                        cv.ANNOTATION_CONTAINER_ID: "cid"},
        "resourceVersion": "9", "uid": "u"}}
    assert cv.wep_pod_patch({"spec": {}}) == {"metadata": {}}
    assert cv.wep_delete_pod_patch() == {"metadata": {"annotations": {cv.ANNOTATION_POD_IP: "",
                                                                       cv.ANNOTATION_POD_IPS: ""}}}


# --- Nodes -------------------------------------------------------------------------------------------


def _node() -> dict[str, Any]:
    return {"metadata": {"name": "node-1", "resourceVersion": "5", "uid": "nu", "labels": {"kubernetes.io/os": "linux"},
                         "annotations": {
                             cv.NODE_IPV4_ADDR: "192.168.0.10/24",
                             cv.NODE_AS_NUMBER: "64512",
                             cv.NODE_RR_CLUSTER_ID: "224.0.0.1",
                             cv.NODE_IPV4_IPIP_TUNNEL_ADDR: "10.244.1.0",
                             cv.NODE_IPV4_VXLAN_TUNNEL_ADDR: "10.244.1.1",
                             cv.NODE_VXLAN_TUNNEL_MAC: "66:aa:bb:cc:dd:ee",
                             cv.NODE_IPV6_ADDR: "not-an-ip",
                             cv.LABELS_ANNOTATION: '{"calico-only":"yes"}',
                             cv.NODE_WG_PUBLIC_KEY: "key=",
                         }},
            "spec": {"podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.10"},
                                     {"type": "Hostname", "address": "node-1"}]}}


def test_k8s_node_to_calico() -> None:
    res = cv.k8s_node_to_calico(_node())
    md, spec = res["metadata"], res["spec"]
    assert res["kind"] == "Node" and md["name"] == "node-1" and md["resourceVersion"] == "5"
    assert md["labels"] == {"calico-only": "yes", "kubernetes.io/os": "linux"}
    assert md["annotations"][cv.NODE_KUBE_LABELS] == '{"kubernetes.io/os":"linux"}'
    assert spec["bgp"] == {"ipv4Address": "192.168.0.10/24", "asNumber": 64512,
                           "routeReflectorClusterID": "224.0.0.1", "ipv4IPIPTunnelAddr": "10.244.1.0"}
    assert spec["ipv4VXLANTunnelAddr"] == "10.244.1.1"
    assert spec["vxlanTunnelMACAddr"] == "66:aa:bb:cc:dd:ee"
    assert spec["orchRefs"] == [{"nodeName": "node-1", "orchestrator": "k8s"}]
    assert spec["addresses"] == [{"address": "192.168.0.10/24", "type": "CalicoNodeIP"},
                                 {"address": "192.168.0.10", "type": "InternalIP"}]
    assert res["status"] == {"wireguardPublicKey": "key=", "podCIDRs": ["10.244.1.0/24"]}


def test_node_with_pod_cidr_tunnel_address() -> None:
    node = _node()
    node["spec"]["podCIDR"] = "10.244.7.0/24"
    assert cv.k8s_node_to_calico(node, use_pod_cidr=True)["spec"]["bgp"]["ipv4IPIPTunnelAddr"] == "10.244.7.1"


def test_as_number_forms() -> None:
    assert cv.parse_as_number("64512") == 64512
    assert cv.parse_as_number("1.10") == 65546
    assert cv.parse_as_number("x") is None
    assert cv.parse_as_number(str(2**32)) is None


def test_calico_node_patch_round_trip() -> None:
    calico = cv.k8s_node_to_calico(_node())
    calico["spec"]["bgp"] = {"ipv4Address": "192.168.0.11/24", "asNumber": 65001}
    calico["spec"]["ipv4VXLANTunnelAddr"] = "10.244.1.9"
    del calico["spec"]["vxlanTunnelMACAddr"]
    calico["metadata"]["labels"]["extra"] = "1"
    patch = cv.calico_node_patch(calico, resource_version="5")
    ann = patch["metadata"]["annotations"]
    assert patch["metadata"]["resourceVersion"] == "5"
    assert ann[cv.NODE_IPV4_ADDR] == "192.168.0.11/24"
    assert ann[cv.NODE_AS_NUMBER] == "65001"
    assert ann[cv.NODE_RR_CLUSTER_ID] is None and ann[cv.NODE_IPV4_IPIP_TUNNEL_ADDR] is None
    assert ann[cv.NODE_IPV4_VXLAN_TUNNEL_ADDR] == "10.244.1.9"
    assert ann[cv.NODE_VXLAN_TUNNEL_MAC] is None
    # Inherited k8s labels are not stored; Calico's own are.
    assert json.loads(ann[cv.LABELS_ANNOTATION]) == {"calico-only": "yes", "extra": "1"}
    assert ann[cv.ANNOTATIONS_ANNOTATION] is None
    assert "labels" not in patch["metadata"]


# --- Profiles and NetworkPolicies ------------------------------------------------------------------


def test_namespace_and_service_account_profiles() -> None:
    ns = {"metadata": {"name": "shop", "resourceVersion": "3", "labels": {"team": "a"},
                       "uid": "30316465-6365-4463-ad63-3564622d3638"}}
    p = cv.namespace_to_profile(ns)
    assert p["metadata"]["name"] == "kns.shop"
    assert p["metadata"]["resourceVersion"] == "3/"
    assert p["metadata"]["uid"] == "0c8c26a6-c6a6-44c6-adc6-ac2646b46c1c"
    assert p["spec"] == {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                         "labelsToApply": {"pcns.team": "a", "pcns.projectcalico.org/name": "shop"}}
    sa = {"metadata": {"name": "web", "namespace": "shop", "resourceVersion": "8", "labels": {"x": "y"}}}
    q = cv.service_account_to_profile(sa)
    assert q["metadata"]["name"] == "ksa.shop.web" and q["metadata"]["resourceVersion"] == "/8"
    assert q["spec"] == {"labelsToApply": {"pcsa.x": "y", "pcsa.projectcalico.org/name": "web"}}
    assert cv.profile_name_to_namespace("kns.shop") == "shop"
    assert cv.profile_name_to_service_account("ksa.shop.web.x") == ("shop", "web.x")
    assert cv.split_profile_revision("3/8") == ("3", "8")
    assert cv.split_profile_revision("") == ("", "")
    with pytest.raises(ValueError):
        cv.split_profile_revision("3")


def test_k8s_network_policy_passthrough() -> None:
    np = {"metadata": {"name": "deny", "namespace": "shop", "resourceVersion": "4"},
          "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    res = cv.k8s_network_policy_to_resource(np)
    assert res["kind"] == "KubernetesNetworkPolicy"
    assert res["metadata"] == {"name": "deny", "namespace": "shop", "resourceVersion": "4"}
    assert res["spec"] == np["spec"]


# --- etcd layout -------------------------------------------------------------------------------------


def test_etcd_v3_paths() -> None:
    assert cv.etcd_v3_path(Key("IPPool", "p1")) == "/calico/resources/v3/projectcalico.org/ippools/p1"
    assert (cv.etcd_v3_path(Key("WorkloadEndpoint", "n-k8s-p-eth0", "ns"))
            == "/calico/resources/v3/projectcalico.org/workloadendpoints/ns/n-k8s-p-eth0")
    assert cv.etcd_v3_path(Key("Node", "n1")) == "/calico/resources/v3/projectcalico.org/nodes/n1"
    assert cv.etcd_v3_path_to_key("NetworkPolicy", "/calico/resources/v3/projectcalico.org/networkpolicies/a/b") \
        == Key("NetworkPolicy", "b", "a")
    assert cv.etcd_v3_path_to_key("IPPool", "/calico/resources/v3/projectcalico.org/ippools/a/b") is None
    with pytest.raises(ValueError):
        cv.etcd_v3_path(Key("NetworkPolicy", "x"))


def test_etcd_v3_encode_decode() -> None:
    key = Key("IPPool", "p1")
    raw = cv.etcd_v3_encode(key, {"metadata": {"name": "p1", "resourceVersion": "5", "uid": "u"}, "spec": {"a": 1}})
    stored = json.loads(raw)
    assert "resourceVersion" not in stored["metadata"] and stored["kind"] == "IPPool"
    res = cv.etcd_v3_decode(key, raw, 17)
    assert res["metadata"] == {"name": "p1", "uid": "u", "resourceVersion": "17"}
    with pytest.raises(cv.ConversionError):
        cv.etcd_v3_decode(key, b"{nope", 1)
    with pytest.raises(cv.ConversionError):
        cv.etcd_v3_decode(key, b'{"spec": 5}', 1)


def test_etcd_ipam_block_layout_and_json() -> None:
    key = Key("IPAMBlock", "10-244-1-0-26")
    spec = {"cidr": "10.244.1.0/26", "affinity": "host:node-1", "affinityClaimTime": "2024-01-01T00:00:00Z",
            "allocations": [0, None], "unallocated": [1], "strictAffinity": False,
            "attributes": [{"handle_id": "k8s-pod-network.abc", "secondary": {"node": "node-1"}}],
            "sequenceNumber": 3, "sequenceNumberForAllocation": {"0": 2}, "deleted": False}
    path, raw = cv.etcd_ipam_encode("IPAMBlock", key, {"spec": spec})
    assert path == "/calico/ipam/v2/assignment/ipv4/block/10.244.1.0-26"
    v1 = json.loads(raw)
    assert v1["affinity_claim_time"] == "2024-01-01T00:00:00Z" and "strictAffinity" not in v1
    assert v1["attributes"][0]["handle_id"] == "k8s-pod-network.abc"
    res = cv.etcd_ipam_decode("IPAMBlock", path, raw, 9)
    assert res["metadata"] == {"name": "10-244-1-0-26", "resourceVersion": "9"}
    assert res["spec"] == spec
    assert cv.etcd_ipam_path_to_key("IPAMBlock", path) == key
    with pytest.raises(ValueError, match="does not match"):
        cv.etcd_ipam_encode("IPAMBlock", Key("IPAMBlock", "10-0-0-0-26"), {"spec": spec})
    legacy = cv.etcd_ipam_decode("IPAMBlock", path, b'{"cidr":"10.244.1.0/26","hostAffinity":"old"}', 1)
    assert legacy["spec"]["affinity"] == "host:old"


def test_etcd_ipam_affinity_handle_config() -> None:
    aff_key = Key("BlockAffinity", "node-1-10-244-1-0-26")
    path, raw = cv.etcd_ipam_encode("BlockAffinity", aff_key, {"spec": {
        "node": "node-1", "cidr": "10.244.1.0/26", "state": "confirmed", "deleted": False}})
    assert path == "/calico/ipam/v2/host/node-1/ipv4/block/10.244.1.0-26"
    assert json.loads(raw) == {"state": "confirmed", "deleted": False}
    res = cv.etcd_ipam_decode("BlockAffinity", path, raw, 3)
    assert res["metadata"]["name"] == "node-1-10-244-1-0-26"
    assert res["spec"] == {"state": "confirmed", "node": "node-1", "cidr": "10.244.1.0/26", "type": "host",
                           "deleted": False}
    empty = cv.etcd_ipam_decode("BlockAffinity", path, b"", 3)  # pre-JSON Calico affinities
    assert empty["spec"]["state"] == "" and empty["spec"]["deleted"] is False
    assert cv.etcd_ipam_candidate_paths(aff_key) == [path, path.replace("/host/", "/virtual/")]

    h_key = Key("IPAMHandle", "k8s-pod-network.abc")
    hpath, hraw = cv.etcd_ipam_encode("IPAMHandle", h_key, {"spec": {"handleID": "k8s-pod-network.abc",
                                                                     "block": {"10.244.1.0/26": 1}}})
    assert hpath == "/calico/ipam/v2/handle/k8s-pod-network.abc"
    assert json.loads(hraw) == {"block": {"10.244.1.0/26": 1}, "deleted": False}
    assert cv.etcd_ipam_decode("IPAMHandle", hpath, hraw, 1)["spec"]["handleID"] == "k8s-pod-network.abc"

    c_key = Key("IPAMConfig", "default")
    cpath, craw = cv.etcd_ipam_encode("IPAMConfig", c_key, {"spec": {"strictAffinity": False,
                                                                     "autoAllocateBlocks": True,
                                                                     "maxBlocksPerHost": 0}})
    assert cpath == "/calico/ipam/v2/config"
    assert json.loads(craw) == {"auto_allocate_blocks": True}
    assert cv.etcd_ipam_decode("IPAMConfig", cpath, craw, 1)["spec"] == {
        "strictAffinity": False, "autoAllocateBlocks": True, "maxBlocksPerHost": 0}
    with pytest.raises(ValueError):
        cv.etcd_ipam_encode("IPAMConfig", Key("IPAMConfig", "other"), {"spec": {}})


def test_etcd_ipam_ranges_cover_both_affinity_types() -> None:
    start, end = cv.etcd_ipam_range("BlockAffinity")
    for p in ("/calico/ipam/v2/host/a/ipv4/block/10.0.0.0-26", "/calico/ipam/v2/virtual/a/ipv4/block/10.0.0.0-26"):
        assert start <= p < end
    assert not start <= "/calico/ipam/v2/handle/x" < end
    assert not start <= "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26" < end
