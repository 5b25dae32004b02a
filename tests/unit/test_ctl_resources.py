"""Pure parts of ``felixpy get/apply/create/replace/delete``: kind names, document parsing and validation
(a bad document is reported with its position and name), and output rendering."""

from __future__ import annotations

import json

import pytest
import yaml

from felixpy.ctl.resources import (
    DocumentError,
    kind_info,
    load_docs,
    normalise,
    parse_documents,
    render,
    tabulate,
)
from felixpy.datastore.api import Key, KVPair

POOL = """
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: pool-a
  labels: {team: net}
spec:
  cidr: 10.70.0.0/16
  blockSize: 26
  vxlanMode: Always
"""


@pytest.mark.parametrize(("alias", "kind"), [
    ("ippools", "IPPool"), ("pool", "IPPool"), ("gnp", "GlobalNetworkPolicy"), ("NetworkPolicy", "NetworkPolicy"),
    ("netpol", "NetworkPolicy"), ("hep", "HostEndpoint"), ("wep", "WorkloadEndpoint"),
    ("bgpconfig", "BGPConfiguration"),
    ("bgppeers", "BGPPeer"), ("felixconfig", "FelixConfiguration"), ("globalnetworksets", "GlobalNetworkSet"),
    ("networkset", "NetworkSet"), ("profiles", "Profile"), ("nodes", "Node"), ("ipamblocks", "IPAMBlock"),
])
def test_kind_aliases(alias: str, kind: str) -> None:
    assert kind_info(alias).kind == kind


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="not supported"):
        kind_info("pods")


def test_multi_doc_yaml_json_and_list() -> None:
    lst = json.dumps({"apiVersion": "projectcalico.org/v3", "kind": "List", "items": [
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "rr"},
         "spec": {"peerIP": "192.0.2.1", "asNumber": 64512}},
        {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkSet", "metadata": {"name": "ext"},
         "spec": {"nets": ["198.51.100.0/24"]}}]})
    docs = load_docs([("a.yaml", POOL + "---\n" + POOL.replace("pool-a", "pool-b").replace("10.70", "10.71")),
                      ("b.json", lst)], namespace=None, need_spec=True)
    assert [d.label for d in docs] == ["IPPool(pool-a)", "IPPool(pool-b)", "BGPPeer(rr)", "GlobalNetworkSet(ext)"]
    assert docs[0].resource["metadata"] == {"name": "pool-a", "labels": {"team": "net"}}


def test_namespaces() -> None:
    np = {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy", "metadata": {"name": "allow"},
          "spec": {"selector": "all()", "ingress": [{"action": "Allow"}]}}
    assert normalise(np).key == Key("NetworkPolicy", "allow", "default")
    assert normalise(np, namespace="prod").key.namespace == "prod"
    with pytest.raises(DocumentError, match="does not match"):
        normalise({**np, "metadata": {"name": "allow", "namespace": "a"}}, namespace="b")
    with pytest.raises(DocumentError, match="not namespaced"):
        normalise({**yaml.safe_load(POOL), "metadata": {"name": "x", "namespace": "a"}})


@pytest.mark.parametrize(("doc", "msg"), [
    ({"apiVersion": "v1", "kind": "IPPool", "metadata": {"name": "x"}}, "apiVersion must be"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "ippool", "metadata": {"name": "x"}}, "did you mean IPPool"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "Pod", "metadata": {"name": "x"}}, "not a Calico resource"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {}}, "metadata.name is missing"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "Bad_Name"},
      "spec": {"cidr": "10.0.0.0/16"}}, "invalid name"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "x"}, "sepc": {}}, "unknown field"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "x"},
      "spec": {"cidr": "10.0.0.0/16", "ipipMode": "Sometimes"}}, "ipipMode"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "x"}, "spec": {"cidr": "nope"}},
     "invalid cidr"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy", "metadata": {"name": "x"},
      "spec": {"selector": "app ==", "types": ["Ingress"]}}, "selector"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "x"},
      "spec": {"peerIP": "nope", "asNumber": 1}}, "peerIP"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "HostEndpoint", "metadata": {"name": "x"}, "spec": {}},
     "spec.node"),
    ({"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "x", "labels": {"a": 1}},
      "spec": {"cidr": "10.0.0.0/16"}}, "metadata.labels"),
    (["not", "an", "object"], "expected an object"),
])
def test_invalid_documents(doc: object, msg: str) -> None:
    with pytest.raises(DocumentError, match=msg):
        normalise(doc)


def test_one_bad_document_fails_the_whole_file_naming_it() -> None:
    bad = POOL.replace("pool-a", "pool-c").replace("10.70.0.0/16", "10.70.0.0/99")
    with pytest.raises(DocumentError) as e:
        load_docs([("f.yaml", POOL + "---\n" + bad)], namespace=None, need_spec=True)
    assert "f.yaml: document 2 (IPPool pool-c)" in str(e.value)
    assert "pool-a" not in str(e.value)


def test_unparsable_and_empty() -> None:
    with pytest.raises(DocumentError, match="not valid YAML"):
        parse_documents("a: [", "x")
    with pytest.raises(DocumentError, match="no resources"):
        parse_documents("---\n", "x")


def test_render_outputs() -> None:
    docs = load_docs([("a", POOL)], namespace=None, need_spec=True)
    kvs = [KVPair(docs[0].key, docs[0].resource, "12")]
    info = kind_info("ippool")
    assert render(kvs, info, "ps", single=False).splitlines() == [
        "NAME     CIDR           SELECTOR", "pool-a   10.70.0.0/16   all()"]
    assert "Always" in render(kvs, info, "wide", single=False)
    one = yaml.safe_load(render(kvs, info, "yaml", single=True))
    assert one["kind"] == "IPPool" and one["metadata"]["resourceVersion"] == "12"
    many = json.loads(render(kvs, info, "json", single=False, revision="20"))
    assert many["kind"] == "IPPoolList" and many["items"][0]["spec"]["cidr"] == "10.70.0.0/16"
    assert render(kvs, info, "name", single=False) == "ippool/pool-a"
    assert tabulate(["A", "BB"], [["xyz", ""]]) == "A     BB\nxyz"
