"""``felixpy get|create|apply|replace|delete`` against a running two-node lab's datastore (etcd and the
Kubernetes API): round trips of IPPool, GlobalNetworkPolicy and BGPPeer, and a bad document that must
leave the datastore untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from felixpy import labnet
from tests.e2e.multinode import Cluster

pytestmark = [pytest.mark.root, pytest.mark.realparts, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable

DOCS = """
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: cli-pool
spec:
  cidr: 10.123.0.0/16
  blockSize: 28
  disabled: true
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: cli-gnp
spec:
  order: 50
  selector: cli-test == 'nobody'
  types: [Ingress]
  ingress:
  - action: Allow
    protocol: TCP
    destination: {ports: [8080]}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: cli-peer
spec:
  peerIP: 192.0.2.77
  asNumber: 64999
  node: nobody
"""


@pytest.fixture(scope="module", params=labnet.DATASTORES)
def lab(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if request.param == "kubernetes" and not os.access(labnet.KUBE_APISERVER_BINARY, os.X_OK):
        pytest.skip(f"kube-apiserver not built ({labnet.KUBE_APISERVER_BINARY})")
    with Cluster(mode="vxlan", nodes=2, datastore=request.param) as c:
        yield c


def ctl(c: Cluster, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **c.datastore.env(), "NODENAME": "operator"}
    return subprocess.run([PYTHON, "-m", "felixpy", *args], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO, input=stdin)


def get_yaml(c: Cluster, kind: str, name: str) -> dict[str, object] | None:
    r = ctl(c, "get", kind, name, "-o", "yaml")
    if r.returncode != 0:
        assert "does not exist" in r.stderr, r.stderr
        return None
    doc = yaml.safe_load(r.stdout)
    assert isinstance(doc, dict)
    return doc


def test_apply_get_replace_delete_round_trip(lab: Cluster, tmp_path: Path) -> None:
    c = lab
    f = tmp_path / "res.yaml"
    f.write_text(DOCS)
    r = ctl(c, "apply", "-f", str(f))
    assert r.returncode == 0 and "Successfully applied 3 resource(s)" in r.stdout, (r.stdout, r.stderr)
    try:
        want = list(yaml.safe_load_all(DOCS))
        for doc, (kind, name) in zip(want, [("ippool", "cli-pool"), ("gnp", "cli-gnp"), ("bgppeer", "cli-peer")],
                                     strict=True):
            got = get_yaml(c, kind, name)
            assert got is not None and got["kind"] == doc["kind"], got
            spec = got["spec"]
            assert isinstance(spec, dict)
            for k, v in doc["spec"].items():
                assert spec.get(k) == v, (kind, k, spec)
        table = ctl(c, "get", "ippools", "-o", "wide").stdout
        assert any(ln.split()[:2] == ["cli-pool", "10.123.0.0/16"] for ln in table.splitlines()), table
        names = ctl(c, "get", "gnp", "-o", "name").stdout.split()
        assert "globalnetworkpolicy/cli-gnp" in names
        listed = json.loads(ctl(c, "get", "bgppeers", "-o", "json").stdout)
        assert listed["kind"] == "BGPPeerList" and "cli-peer" in [i["metadata"]["name"] for i in listed["items"]]
        nodes = ctl(c, "get", "nodes").stdout.split()
        assert set(c.node_names) <= set(nodes), nodes

        # create refuses what exists; replace changes it; a stale resourceVersion is a conflict.
        r = ctl(c, "create", "-f", str(f))
        assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
        old = get_yaml(c, "gnp", "cli-gnp")
        assert old is not None
        changed = DOCS.replace("order: 50", "order: 60")
        r = ctl(c, "replace", "-f", "-", stdin=changed)
        assert r.returncode == 0, r.stderr
        now = get_yaml(c, "gnp", "cli-gnp")
        assert now is not None and now["spec"]["order"] == 60  # type: ignore[index]
        stale = yaml.safe_dump(old)
        r = ctl(c, "apply", "-f", "-", stdin=stale)
        assert r.returncode == 1 and "conflict" in r.stderr.lower(), (r.stdout, r.stderr)
        assert get_yaml(c, "gnp", "cli-gnp")["spec"]["order"] == 60  # type: ignore[index]
    finally:
        r = ctl(c, "delete", "-f", str(f), "--skip-not-exists")
    assert r.returncode == 0 and "Successfully deleted 3 resource(s)" in r.stdout, (r.stdout, r.stderr)
    for kind, name in (("ippool", "cli-pool"), ("gnp", "cli-gnp"), ("bgppeer", "cli-peer")):
        assert get_yaml(c, kind, name) is None
    r = ctl(c, "delete", "ippool", "cli-pool")
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_bad_document_writes_nothing(lab: Cluster, tmp_path: Path) -> None:
    c = lab
    bad = DOCS.replace("selector: cli-test == 'nobody'", "selector: cli-test ==").replace("cli-", "bad-")
    r = ctl(c, "apply", "-f", "-", stdin=bad)
    assert r.returncode == 1, r.stdout
    assert "document 2 (GlobalNetworkPolicy bad-gnp)" in r.stderr and "selector" in r.stderr, r.stderr
    for kind, name in (("ippool", "bad-pool"), ("gnp", "bad-gnp"), ("bgppeer", "bad-peer")):
        assert get_yaml(c, kind, name) is None, f"{kind} {name} was written"
    wrong_api = DOCS.replace("projectcalico.org/v3", "crd.projectcalico.org/v1", 1)
    r = ctl(c, "create", "-f", "-", stdin=wrong_api)
    assert r.returncode == 1 and "apiVersion must be projectcalico.org/v3" in r.stderr, r.stderr
    assert get_yaml(c, "ippool", "cli-pool") is None
    r = ctl(c, "get", "pods")
    assert r.returncode == 1 and "not supported" in r.stderr
