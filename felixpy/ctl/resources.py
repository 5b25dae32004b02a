"""``felixpy get|create|apply|replace|delete``: calicoctl's resource verbs for Calico v3 resources.

Documents (``-f FILE``, ``-`` for stdin) are YAML or JSON, several per file, and ``kind: List`` (or
``<Kind>List``) documents are expanded. Every document is parsed and validated before anything is
written, so a file with one bad document writes nothing. Kinds are named as calicoctl names them,
short names included (``ippool``/``ippools``/``pool``, ``gnp``, ``hep``, ``wep``, ...).

Writes are compare-and-swap: ``replace``/``apply`` update at the stored revision (or at the document's
``metadata.resourceVersion`` when it has one, so an edit of an older read fails instead of overwriting).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from felixpy.ctl import datastore_args, open_backend
from felixpy.datastore import api
from felixpy.datastore.api import (
    API_VERSION_V3,
    AlreadyExists,
    Backend,
    DatastoreError,
    Key,
    KVPair,
    ListOptions,
    NotFound,
    Resource,
)

# -- kinds ------------------------------------------------------------------------------------------

Column = tuple[str, Callable[[Resource], str]]


def _spec(res: Resource) -> dict[str, Any]:
    s = res.get("spec")
    return s if isinstance(s, dict) else {}


def _md(res: Resource) -> dict[str, Any]:
    m = res.get("metadata")
    return m if isinstance(m, dict) else {}


def _f(*path: str, default: str = "") -> Callable[[Resource], str]:
    def get(res: Resource) -> str:
        v: Any = res
        for p in path:
            if not isinstance(v, dict):
                return default
            v = v.get(p)
        if v is None or v == "":
            return default
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return ",".join(str(x) for x in v)
        return str(v)

    return get


NAME: Column = ("NAME", _f("metadata", "name"))
NAMESPACE: Column = ("NAMESPACE", _f("metadata", "namespace"))


@dataclass(frozen=True)
class KindInfo:
    kind: str
    aliases: tuple[str, ...]
    columns: tuple[Column, ...] = (NAME,)
    wide: tuple[Column, ...] = ()
    writable: bool = True

    @property
    def namespaced(self) -> bool:
        from felixpy.datastore.conversion import is_namespaced

        return is_namespaced(self.kind)


KINDS: tuple[KindInfo, ...] = (
    KindInfo(api.KIND_BGP_CONFIG, ("bgpconfiguration", "bgpconfigurations", "bgpconfig", "bgpconfigs"),
             (NAME, ("LOGSEVERITY", _f("spec", "logSeverityScreen")),
              ("MESHENABLED", _f("spec", "nodeToNodeMeshEnabled")), ("ASNUMBER", _f("spec", "asNumber", default="-")))),
    KindInfo(api.KIND_BGP_PEER, ("bgppeer", "bgppeers", "bgpp", "bgpps", "bp", "bps"),
             (NAME, ("PEERIP", _f("spec", "peerIP")), ("NODE", _f("spec", "node", default="(global)")),
              ("ASN", _f("spec", "asNumber"))),
             (NAME, ("PEERIP", _f("spec", "peerIP")), ("NODE", _f("spec", "node", default="(global)")),
              ("ASN", _f("spec", "asNumber")), ("NODESELECTOR", _f("spec", "nodeSelector")),
              ("PEERSELECTOR", _f("spec", "peerSelector")))),
    KindInfo(api.KIND_FELIX_CONFIG, ("felixconfiguration", "felixconfigurations", "felixconfig", "felixconfigs")),
    KindInfo(api.KIND_GLOBAL_NETWORK_POLICY, ("globalnetworkpolicy", "globalnetworkpolicies", "gnp", "gnps"),
             (NAME,), (NAME, ("ORDER", _f("spec", "order")), ("SELECTOR", _f("spec", "selector")))),
    KindInfo(api.KIND_GLOBAL_NETWORK_SET, ("globalnetworkset", "globalnetworksets"),
             (NAME,), (NAME, ("NETS", _f("spec", "nets")))),
    KindInfo(api.KIND_HOST_ENDPOINT, ("hostendpoint", "hostendpoints", "hep", "heps"),
             (NAME, ("NODE", _f("spec", "node"))),
             (NAME, ("NODE", _f("spec", "node")), ("INTERFACE", _f("spec", "interfaceName")),
              ("IPS", _f("spec", "expectedIPs")), ("PROFILES", _f("spec", "profiles")))),
    KindInfo(api.KIND_IPPOOL, ("ippool", "ippools", "ipp", "ipps", "pool", "pools"),
             (NAME, ("CIDR", _f("spec", "cidr")), ("SELECTOR", _f("spec", "nodeSelector", default="all()"))),
             (NAME, ("CIDR", _f("spec", "cidr")), ("NAT", _f("spec", "natOutgoing", default="false")),
              ("IPIPMODE", _f("spec", "ipipMode", default="Never")),
              ("VXLANMODE", _f("spec", "vxlanMode", default="Never")),
              ("DISABLED", _f("spec", "disabled", default="false")),
              ("DISABLEBGPEXPORT", _f("spec", "disableBGPExport", default="false")),
              ("SELECTOR", _f("spec", "nodeSelector", default="all()")))),
    KindInfo(api.KIND_NETWORK_POLICY, ("networkpolicy", "networkpolicies", "policy", "policies", "np", "nps",
                                       "pol", "pols", "netpol", "netpols"),
             (NAME,), (NAME, ("ORDER", _f("spec", "order")), ("SELECTOR", _f("spec", "selector")))),
    KindInfo(api.KIND_NETWORK_SET, ("networkset", "networksets", "netset", "netsets"),
             (NAME,), (NAME, ("NETS", _f("spec", "nets")))),
    KindInfo(api.KIND_PROFILE, ("profile", "profiles", "pro", "pros")),
    KindInfo(api.KIND_NODE, ("node", "nodes", "no", "nos"),
             (NAME,), (NAME, ("ASN", _f("spec", "bgp", "asNumber", default="(64512)")),
                       ("IPV4", _f("spec", "bgp", "ipv4Address")), ("IPV6", _f("spec", "bgp", "ipv6Address")))),
    KindInfo(api.KIND_WEP, ("workloadendpoint", "workloadendpoints", "wep", "weps"),
             (("WORKLOAD", _f("spec", "pod")), ("NODE", _f("spec", "node")),
              ("NETWORKS", _f("spec", "ipNetworks")), ("INTERFACE", _f("spec", "interfaceName"))),
             (NAME, ("WORKLOAD", _f("spec", "pod")), ("NODE", _f("spec", "node")),
              ("NETWORKS", _f("spec", "ipNetworks")), ("INTERFACE", _f("spec", "interfaceName")),
              ("PROFILES", _f("spec", "profiles")))),
    KindInfo(api.KIND_TIER, ("tier", "tiers"), (NAME, ("ORDER", _f("spec", "order")))),
    KindInfo(api.KIND_CLUSTER_INFO, ("clusterinformation", "clusterinformations", "clusterinfo"),
             (NAME, ("GUID", _f("spec", "clusterGUID")), ("READY", _f("spec", "datastoreReady")))),
    KindInfo(api.KIND_IPAM_CONFIG, ("ipamconfiguration", "ipamconfigurations", "ipamconfig", "ipamconfigs"),
             (NAME, ("STRICTAFFINITY", _f("spec", "strictAffinity", default="false")),
              ("MAXBLOCKSPERHOST", _f("spec", "maxBlocksPerHost", default="0")))),
    KindInfo(api.KIND_IPAM_BLOCK, ("ipamblock", "ipamblocks"),
             (NAME, ("CIDR", _f("spec", "cidr")), ("AFFINITY", _f("spec", "affinity"))), writable=False),
    KindInfo(api.KIND_BLOCK_AFFINITY, ("blockaffinity", "blockaffinities", "affinity", "affinities"),
             (NAME, ("NODE", _f("spec", "node")), ("CIDR", _f("spec", "cidr")), ("STATE", _f("spec", "state"))),
             writable=False),
    KindInfo(api.KIND_IPAM_HANDLE, ("ipamhandle", "ipamhandles"), (NAME,), writable=False),
)
_BY_ALIAS = {a: k for k in KINDS for a in (*k.aliases, k.kind.lower())}


def kind_info(name: str) -> KindInfo:
    """The kind a user wrote (``ippools``, ``GlobalNetworkPolicy``, ``gnp``...); raises ValueError."""
    k = _BY_ALIAS.get(name.strip().lower())
    if k is None:
        raise ValueError(f"resource type '{name}' is not supported")
    return k


# -- documents --------------------------------------------------------------------------------------

class DocumentError(ValueError):
    pass


def parse_documents(text: str, source: str = "input") -> list[Any]:
    """Every document of a YAML/JSON stream, ``List`` documents expanded; raises DocumentError."""
    import yaml

    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise DocumentError(f"{source}: not valid YAML/JSON: {e}") from None
    out: list[Any] = []
    for d in docs:
        if isinstance(d, dict) and isinstance(d.get("kind"), str) and d["kind"].endswith("List") \
                and "items" in d:
            items = d.get("items") or []
            if not isinstance(items, list):
                raise DocumentError(f"{source}: a {d['kind']} needs a list of items")
            out.extend(items)
        else:
            out.append(d)
    if not out:
        raise DocumentError(f"{source}: no resources found")
    return out


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TOP_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_MD_FIELDS = frozenset({"name", "namespace", "labels", "annotations", "resourceVersion", "uid", "creationTimestamp",
                        "generation", "ownerReferences", "generateName", "finalizers", "deletionTimestamp",
                        "deletionGracePeriodSeconds", "managedFields"})


@dataclass(frozen=True)
class Doc:
    info: KindInfo
    key: Key
    resource: Resource  # normalised: apiVersion, kind, metadata (name/namespace/labels/annotations), spec
    revision: str  # metadata.resourceVersion from the document ("" if none)

    @property
    def label(self) -> str:
        return f"{self.key.kind}({self.key.namespace + '/' if self.key.namespace else ''}{self.key.name})"


def _str_map(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise DocumentError(f"{where} must be a map of strings to strings")
    return dict(v)


def normalise(doc: Any, *, namespace: str | None = None, need_spec: bool = True) -> Doc:
    """Check one document's envelope and its kind's spec; raises DocumentError."""
    if not isinstance(doc, dict):
        raise DocumentError(f"expected an object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - _TOP_FIELDS)
    if unknown:
        raise DocumentError(f"unknown field(s) {', '.join(unknown)}")
    av = doc.get("apiVersion")
    if av != API_VERSION_V3:
        raise DocumentError(f"apiVersion must be {API_VERSION_V3}, got {av!r}")
    kind_raw = doc.get("kind")
    if not isinstance(kind_raw, str) or not kind_raw:
        raise DocumentError("kind is missing")
    k = _BY_ALIAS.get(kind_raw.lower())
    if k is None or k.kind != kind_raw:
        raise DocumentError(f"kind {kind_raw!r} is not a Calico resource kind"
                            + (f" (did you mean {k.kind}?)" if k else ""))
    md_raw = doc.get("metadata")
    if not isinstance(md_raw, dict):
        raise DocumentError("metadata is missing or not an object")
    unknown = sorted(set(md_raw) - _MD_FIELDS)
    if unknown:
        raise DocumentError(f"unknown metadata field(s) {', '.join(unknown)}")
    name = md_raw.get("name")
    if not isinstance(name, str) or not name:
        raise DocumentError("metadata.name is missing")
    check_name(k, name)
    ns = md_raw.get("namespace")
    if ns is not None and not isinstance(ns, str):
        raise DocumentError("metadata.namespace must be a string")
    if k.namespaced:
        if ns and namespace and ns != namespace:
            raise DocumentError(f"namespace {ns!r} does not match the requested namespace {namespace!r}")
        ns = ns or namespace or "default"
        if not _DNS_SUBDOMAIN.match(ns) or len(ns) > 63:
            raise DocumentError(f"invalid namespace {ns!r}")
    elif ns:
        raise DocumentError(f"{k.kind} is not namespaced; remove metadata.namespace")
    md: dict[str, Any] = {"name": name}
    if k.namespaced:
        md["namespace"] = ns
    labels = _str_map(md_raw.get("labels"), "metadata.labels")
    annotations = _str_map(md_raw.get("annotations"), "metadata.annotations")
    if labels:
        md["labels"] = labels
    if annotations:
        md["annotations"] = annotations
    spec = doc.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise DocumentError("spec must be an object")
    res: Resource = {"apiVersion": API_VERSION_V3, "kind": k.kind, "metadata": md, "spec": spec}
    if need_spec:
        validate_spec(k.kind, res)
    rv = md_raw.get("resourceVersion")
    return Doc(k, Key(k.kind, name, str(ns) if k.namespaced else ""), res, str(rv) if rv else "")


def check_name(k: KindInfo, name: str) -> None:
    if k.kind == api.KIND_WEP:
        if "/" in name:
            raise DocumentError(f"invalid name {name!r}: '/' is not allowed")
        return
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise DocumentError(f"invalid name {name!r}: must be lower case letters, digits, '-' and '.', starting and "
                            "ending with a letter or digit (at most 253 characters)")


def validate_spec(kind: str, res: Resource) -> None:
    """The same parsers the agent uses on what it reads, so what is accepted here is what it can use."""
    try:
        if kind == api.KIND_IPPOOL:
            from felixpy.ipam.pools import parse_pool

            parse_pool(res)
        elif kind in (api.KIND_NETWORK_POLICY, api.KIND_GLOBAL_NETWORK_POLICY):
            from felixpy.model.policy_parse import parse_policy

            parse_policy(res, kind)
        elif kind in (api.KIND_NETWORK_SET, api.KIND_GLOBAL_NETWORK_SET):
            from felixpy.model.policy_parse import parse_network_set

            parse_network_set(res, kind == api.KIND_GLOBAL_NETWORK_SET)
        elif kind == api.KIND_PROFILE:
            from felixpy.model.policy_parse import parse_profile

            parse_profile(res)
        elif kind == api.KIND_TIER:
            from felixpy.model.policy_parse import parse_tier

            parse_tier(res)
        elif kind == api.KIND_BGP_PEER:
            from bgp.peers import parse_bgp_peer

            parse_bgp_peer(res)
        elif kind == api.KIND_BGP_CONFIG:
            from bgp.peers import parse_bgp_configuration

            parse_bgp_configuration(res)
        elif kind == api.KIND_NODE:
            from felixpy.model.resources import parse_node

            parse_node(res)
        elif kind == api.KIND_WEP:
            from felixpy.model.resources import parse_wep

            parse_wep(res)
        elif kind == api.KIND_HOST_ENDPOINT:
            _validate_hep(_spec(res))
    except DocumentError:
        raise
    except ValueError as e:
        raise DocumentError(str(e)) from None


def _validate_hep(spec: dict[str, Any]) -> None:
    import ipaddress

    if not isinstance(spec.get("node"), str) or not spec["node"]:
        raise DocumentError("HostEndpoint: spec.node is required")
    ips = spec.get("expectedIPs") or []
    if not isinstance(ips, list):
        raise DocumentError("HostEndpoint: spec.expectedIPs must be a list")
    for ip in ips:
        try:
            ipaddress.ip_address(str(ip))
        except ValueError:
            raise DocumentError(f"HostEndpoint: spec.expectedIPs has an invalid address {ip!r}") from None
    if not spec.get("interfaceName") and not ips:
        raise DocumentError("HostEndpoint: give spec.interfaceName or spec.expectedIPs")


def load_docs(texts: Sequence[tuple[str, str]], *, namespace: str | None, need_spec: bool) -> list[Doc]:
    """Parse and validate every document of every (source, text); raises DocumentError listing every
    bad document (nothing is written when any is bad)."""
    errors: list[str] = []
    out: list[Doc] = []
    for source, text in texts:
        try:
            raw = parse_documents(text, source)
        except DocumentError as e:
            errors.append(str(e))
            continue
        for i, d in enumerate(raw, 1):
            try:
                out.append(normalise(d, namespace=namespace, need_spec=need_spec))
            except DocumentError as e:
                what = ""
                if isinstance(d, dict):
                    md = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
                    what = f" ({d.get('kind', '?')} {(md or {}).get('name', '?')})"
                errors.append(f"{source}: document {i}{what}: {e}")
    if errors:
        raise DocumentError("\n".join(errors))
    return out


# -- output -----------------------------------------------------------------------------------------

def for_output(kv: KVPair) -> Resource:
    res = dict(kv.value)
    md = dict(_md(res))
    if kv.revision:
        md["resourceVersion"] = kv.revision
    res["metadata"] = md
    res.setdefault("apiVersion", API_VERSION_V3)
    return {"apiVersion": res.pop("apiVersion"), "kind": res.pop("kind", kv.key.kind), "metadata": res.pop("metadata"),
            **res}


def render(kvs: Sequence[KVPair], info: KindInfo, output: str, *, single: bool, revision: str = "",
           all_namespaces: bool = False) -> str:
    """``get`` output: ``ps`` (table), ``wide``, ``yaml``, ``json`` or ``name``."""
    if output in ("yaml", "json"):
        items = [for_output(kv) for kv in kvs]
        obj: Any = items[0] if single and len(items) == 1 else {
            "apiVersion": API_VERSION_V3, "kind": f"{info.kind}List", "items": items,
            "metadata": {"resourceVersion": revision}}
        if output == "json":
            return json.dumps(obj, indent=2)
        import yaml

        return str(yaml.safe_dump(obj, default_flow_style=False, sort_keys=False)).rstrip("\n")
    if output == "name":
        return "\n".join(f"{info.kind.lower()}/{kv.key.name}" for kv in kvs)
    cols = list(info.wide or info.columns) if output == "wide" else list(info.columns)
    if all_namespaces and info.namespaced:
        cols = [NAMESPACE, *cols]
    return tabulate([h for h, _ in cols], [[fn(kv.value) for _, fn in cols] for kv in kvs])


def tabulate(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """calicoctl's ``ps`` table: Go tabwriter, three spaces between columns, no borders."""
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [list(headers), *rows]]
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------------

PAST = {"create": "created", "apply": "applied", "replace": "replaced", "delete": "deleted"}


def _read_inputs(files: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for f in files:
        if f == "-":
            out.append(("stdin", sys.stdin.read()))
        else:
            try:
                with open(f) as fh:
                    out.append((f, fh.read()))
            except OSError as e:
                raise DocumentError(f"cannot read {f}: {e}") from None
    return out


def _run(args: argparse.Namespace, fn: Callable[[Backend], Any]) -> int:
    async def go() -> int:
        backend = await open_backend(args)
        try:
            rc: int = await fn(backend)
            return rc
        finally:
            await backend.close()

    try:
        return asyncio.run(go())
    except DatastoreError as e:
        print(f"Failed to execute command: {e}", file=sys.stderr)
        return 1


async def write_one(b: Backend, verb: str, d: Doc, *, skip_not_exists: bool = False) -> str:
    """Perform ``verb`` for one document; "" on success, else the error text."""
    try:
        if verb == "create":
            await b.create(d.key, d.resource)
        elif verb == "delete":
            try:
                await b.delete(d.key, revision=d.revision)
            except NotFound:
                if not skip_not_exists:
                    raise
        else:
            try:
                cur = await b.get(d.key)
            except NotFound:
                if verb == "replace":
                    raise
                await b.create(d.key, d.resource)
                return ""
            md = dict(d.resource["metadata"])
            for keep in ("uid", "creationTimestamp"):
                if _md(cur.value).get(keep):
                    md[keep] = _md(cur.value)[keep]
            await b.update(KVPair(d.key, {**d.resource, "metadata": md}, d.revision or cur.revision, cur.uid))
    except NotFound:
        return f"resource does not exist: {d.label}"
    except AlreadyExists:
        return f"resource already exists: {d.label}"
    except api.Conflict as e:
        return f"update conflict: {d.label}: {e}"
    except DatastoreError as e:
        return f"{d.label}: {e}"
    return ""


def cmd_write(args: argparse.Namespace) -> int:
    verb = args.cmd
    try:
        if args.filename:
            docs = load_docs(_read_inputs(args.filename), namespace=args.namespace, need_spec=verb != "delete")
        elif verb == "delete" and args.kind:
            if not args.names:
                raise DocumentError("give the name(s) of the resources to delete")
            info = kind_info(args.kind)
            docs = [normalise({"apiVersion": API_VERSION_V3, "kind": info.kind,
                               "metadata": {"name": n, **({"namespace": args.namespace} if args.namespace else {})}},
                              need_spec=False) for n in args.names]
        else:
            raise DocumentError(f"{verb} needs -f FILE" + (" or KIND NAME..." if verb == "delete" else ""))
        not_writable = [d.label for d in docs if not d.info.writable]
        if not_writable:
            raise DocumentError(f"cannot {verb} {', '.join(not_writable)}: this kind is managed by IPAM "
                                "(use felixpy ipam)")
    except DocumentError as e:
        print(f"Failed to execute command: {e}", file=sys.stderr)
        return 1

    async def go(b: Backend) -> int:
        done: list[Doc] = []
        for d in docs:
            err = await write_one(b, verb, d, skip_not_exists=getattr(args, "skip_not_exists", False))
            if err:
                if done:
                    print(f"Partial success: {PAST[verb]} the first {len(done)} out of {len(docs)} resources:")
                    for x in done:
                        print(f"  {x.label}")
                print(f"Failed to {verb} '{d.key.kind}' resource: {err}", file=sys.stderr)
                return 1
            done.append(d)
        kinds = {d.key.kind for d in docs}
        what = f"'{next(iter(kinds))}' " if len(kinds) == 1 else ""
        print(f"Successfully {PAST[verb]} {len(docs)} {what}resource(s)")
        return 0

    return _run(args, go)


def cmd_get(args: argparse.Namespace) -> int:
    try:
        if args.filename:
            docs = load_docs(_read_inputs(args.filename), namespace=args.namespace, need_spec=False)
            targets: list[tuple[KindInfo, list[str]]] = [(d.info, [d.key.name]) for d in docs]
        elif args.kind:
            targets = [(kind_info(args.kind), list(args.names))]
        else:
            raise DocumentError("get needs a resource type (e.g. ippools) or -f FILE")
    except (DocumentError, ValueError) as e:
        print(f"Failed to execute command: {e}", file=sys.stderr)
        return 1

    async def go(b: Backend) -> int:
        chunks: list[str] = []
        rc = 0
        for info, names in targets:
            ns = None if args.all_namespaces or not info.namespaced else (args.namespace or "default")
            kvs: list[KVPair] = []
            rev = ""
            if names:
                for n in names:
                    try:
                        kvs.append(await b.get(Key(info.kind, n, ns or "")))
                    except NotFound:
                        print(f"resource does not exist: {info.kind}({(ns + '/') if ns else ''}{n})", file=sys.stderr)
                        rc = 1
            else:
                res = await b.list(info.kind, ListOptions(namespace=ns))
                kvs = sorted(res.items, key=lambda kv: (kv.key.namespace, kv.key.name))
                rev = res.revision
            if kvs or not names:
                chunks.append(render(kvs, info, args.output, single=bool(names) and len(names) == 1, revision=rev,
                                     all_namespaces=args.all_namespaces))
        if chunks:
            print(("\n---\n" if args.output == "yaml" else "\n").join(c for c in chunks if c))
        return rc

    return _run(args, go)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    kinds = ", ".join(k.aliases[0] for k in KINDS)
    get = sub.add_parser("get", help="show Calico resources (calicoctl get)",
                         description=f"Resource types: {kinds} (plurals and calicoctl's short names work too).")
    datastore_args(get)
    get.add_argument("kind", nargs="?", help="resource type")
    get.add_argument("names", nargs="*", help="names (default: all)")
    get.add_argument("-f", "--filename", action="append", help="the resources named in this file")
    get.add_argument("-n", "--namespace", help="namespace of namespaced kinds (default: default)")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", default="ps", choices=("ps", "wide", "yaml", "json", "name"))
    get.set_defaults(func=cmd_get)
    for verb, text in (("create", "create resources from a file (fails if one exists)"),
                       ("apply", "create or update resources from a file"),
                       ("replace", "update existing resources from a file"),
                       ("delete", "delete resources named in a file, or KIND NAME...")):
        p = sub.add_parser(verb, help=f"{text} (calicoctl {verb})")
        datastore_args(p)
        if verb == "delete":
            p.add_argument("kind", nargs="?", help="resource type")
            p.add_argument("names", nargs="*", help="names")
            p.add_argument("--skip-not-exists", action="store_true", help="a missing resource is not an error")
        p.add_argument("-f", "--filename", action="append", help="YAML or JSON file ('-' for stdin); repeatable")
        p.add_argument("-n", "--namespace", help="namespace for namespaced kinds without one")
        p.set_defaults(func=cmd_write)
