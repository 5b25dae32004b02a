"""``felixpy status``: one verdict per area of this node (OK / WARN / FAIL, each with its reason).

The facts come from the agent's ``/status`` (see :mod:`felixpy.ctl.node` for how it is found) plus one check
of its own: that the datastore answers from here. :func:`evaluate` turns them into checks (pure, unit-tested).
Exit code 1 when any check FAILs, else 0. ``-o json`` prints the checks and the agent's report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from felixpy.ctl import datastore_args, open_backend
from felixpy.ctl.node import AgentUnreachable, agent_url, describe_reason, fetch_agent_status

OK, WARN, FAIL = "OK", "WARN", "FAIL"
RECENT_ERROR = 60.0  # datastore errors younger than this make the datastore check WARN
HIGH_UTILISATION = 0.9


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    reason: str


def _pct(used: int, total: int) -> str:
    return f"{used}/{total} ({100.0 * used / total:.0f}%)" if total else f"{used}/0"


def check_agent(report: Mapping[str, Any] | None, error: str) -> Check:
    if report is None:
        return Check("agent", FAIL, f"not running or unreachable: {error}")
    if not report.get("live", True):
        bad = [r for r in report.get("reporters", []) if not r.get("live")]
        return Check("agent", FAIL, "not live: " + "; ".join(f"{r['name']} {r.get('detail', '')}".strip() for r in bad))
    if not report.get("ready", True):
        bad = [r for r in report.get("reporters", []) if not r.get("ready")]
        return Check("agent", WARN, "running, not ready: "
                     + "; ".join(f"{r['name']}: {r.get('detail') or 'not ready'}" for r in bad))
    return Check("agent", OK, f"running for {float(report.get('uptime', 0)):.0f}s, live and ready")


def check_datastore(report: Mapping[str, Any] | None, probe_error: str | None) -> Check:
    """``probe_error``: None = not probed, "" = the datastore answered from here, else why it did not."""
    if probe_error:
        return Check("datastore", FAIL, f"unreachable from this node: {probe_error}")
    if report is None:
        return Check("datastore", OK if probe_error == "" else WARN,
                     "reachable (agent's view unknown)" if probe_error == "" else "not checked (agent unreachable)")
    ds = report.get("datastore") or {}
    kind = ds.get("type", "?")
    if not ds.get("connected"):
        return Check("datastore", FAIL, f"{kind}: agent not connected yet")
    if ds.get("state") != "in-sync":
        return Check("datastore", WARN, f"{kind}: agent {ds.get('state')}, not in sync yet")
    age = ds.get("last_error_age")
    if isinstance(age, int | float) and age < RECENT_ERROR:
        return Check("datastore", WARN,
                     f"{kind}: in sync, but {ds.get('errors')} watch errors, the last {age:.0f}s ago")
    return Check("datastore", OK, f"{kind}: reachable, agent in sync"
                 + (f" ({ds.get('relists')} relists)" if ds.get("relists") else ""))


def check_dataplane(report: Mapping[str, Any]) -> Check:
    dp = report.get("dataplane") or {}
    failures = int(dp.get("failures") or 0)
    if dp.get("last_error"):
        return Check("dataplane", FAIL, f"last apply failed: {dp['last_error']} ({failures} failures since start)")
    if not dp.get("in_sync") or not dp.get("applies_ok"):
        return Check("dataplane", WARN, "waiting for the first apply after the datastore sync")
    problems = [f"{k}: {v}" for k, v in (dp.get("endpoint_errors") or {}).items()]
    if dp.get("tunnel_problem"):
        problems.append(str(dp["tunnel_problem"]))
    summary = (f"{dp.get('applies_ok')} applies ok, {failures} failed since start; {dp.get('local_endpoints', 0)} "
               f"local endpoints, {dp.get('routes', 0)} routes")
    if problems:
        return Check("dataplane", WARN, f"{summary}; problems: " + "; ".join(problems))
    return Check("dataplane", OK, summary)


def check_bgp(report: Mapping[str, Any]) -> Check:
    bgp = report.get("bgp")
    if not isinstance(bgp, dict):
        return Check("bgp", OK, f"not in use (CALICO_NETWORKING_BACKEND={report.get('networking_backend', '?')})")
    peers = [p for p in bgp.get("peers") or [] if isinstance(p, dict)]
    up = [p for p in peers if p.get("state") == "established"]
    down = [f"{p.get('address')} {p.get('state')}"
            + (f" ({describe_reason(str(p['info']))})" if p.get("info") else "") for p in peers if p not in up]
    if bgp.get("connected") is False and peers:
        return Check("bgp", FAIL, "no connection to the ExaBGP sidecar; sessions: " + ", ".join(down or ["-"]))
    if not peers:
        return Check("bgp", OK, "no BGP peers configured for this node")
    text = f"{len(up)}/{len(peers)} peers established"
    if not bgp.get("ready", True):
        return Check("bgp", FAIL, f"{text}; down: " + ", ".join(down))
    if down:
        return Check("bgp", WARN, f"{text}; down: " + ", ".join(down)
                     + (" (start-up grace)" if not up else ""))
    return Check("bgp", OK, text)


def check_ipam(report: Mapping[str, Any]) -> Check:
    ipam = report.get("ipam") or {}
    blocks = ipam.get("local_blocks") or []
    total = sum(int(b.get("total", 0)) for b in blocks)
    used = sum(int(b.get("allocated", 0)) for b in blocks)
    text = (f"{len(blocks)} blocks ({', '.join(str(b.get('cidr')) for b in blocks)}), {_pct(used, total)} "
            "addresses in use" if blocks else "no blocks affine to this node yet")
    full = [p for p in ipam.get("pools") or []
            if p.get("total") and int(p.get("allocated", 0)) >= HIGH_UTILISATION * int(p["total"])]
    if full:
        return Check("ipam", WARN, text + "; pools nearly full: "
                     + ", ".join(f"{p['cidr']} {_pct(int(p['allocated']), int(p['total']))}" for p in full))
    if total and used >= HIGH_UTILISATION * total:
        return Check("ipam", WARN, text + " (the node will claim or borrow another block)")
    return Check("ipam", OK, text)


def check_policy(report: Mapping[str, Any]) -> Check:
    pol = report.get("policy") or {}
    if not pol.get("enabled"):
        return Check("policy", OK, "enforcement disabled (FELIXPY_POLICY=disabled)")
    text = (f"{pol.get('backend')}: {pol.get('policies', 0)} policies, {pol.get('profiles', 0)} profiles, "
            f"{pol.get('endpoints', 0)} endpoints, {pol.get('ipsets', 0)} IP sets programmed")
    errors = pol.get("errors") or {}
    if errors:
        return Check("policy", FAIL, f"{len(errors)} objects not programmed: "
                     + "; ".join(f"{k}: {v}" for k, v in sorted(errors.items())[:5]) + f" ({text})")
    invalid = int(pol.get("invalid_resources") or 0)
    if invalid:
        return Check("policy", WARN, f"{text}; {invalid} invalid datastore resources skipped (see the agent log)")
    return Check("policy", OK, text)


def evaluate(report: Mapping[str, Any] | None, *, agent_error: str = "",
             datastore_error: str | None = None) -> list[Check]:
    checks = [check_agent(report, agent_error), check_datastore(report, datastore_error)]
    if report is not None:
        checks += [check_dataplane(report), check_bgp(report), check_ipam(report), check_policy(report)]
    return checks


def overall(checks: list[Check]) -> str:
    states = {c.status for c in checks}
    return FAIL if FAIL in states else WARN if WARN in states else OK


def render(checks: list[Check], node: str = "") -> str:
    w = max(len(c.name) for c in checks)
    head = f"felixpy status{' of ' + node if node else ''}: {overall(checks)}"
    return head + "\n" + "\n".join(f"  {c.name.ljust(w)}  {c.status.ljust(4)}  {c.reason}" for c in checks) + "\n"


async def probe_datastore(args: argparse.Namespace, timeout: float) -> str:
    """"" when the datastore answers a small list from here, else the reason."""
    from felixpy.datastore.api import KIND_IPPOOL

    async def go() -> None:
        backend = await open_backend(args)
        try:
            await backend.list(KIND_IPPOOL)
        finally:
            await backend.close()

    try:
        await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except Exception as e:  # any failure is the answer here (config, connection, auth)
        return f"{type(e).__name__}: {e}"
    return ""


def cmd_status(args: argparse.Namespace) -> int:
    url = args.url or agent_url()
    report: dict[str, Any] | None
    err = ""
    try:
        report = fetch_agent_status(url, timeout=args.timeout)
    except AgentUnreachable as e:
        report, err = None, str(e)
    ds_err: str | None = None
    if not args.no_datastore_check:
        ds_err = asyncio.run(probe_datastore(args, args.timeout))
    checks = evaluate(report, agent_error=err, datastore_error=ds_err)
    node = str(report.get("node", "")) if report else ""
    if args.output == "json":
        print(json.dumps({"node": node, "status": overall(checks), "checks": [asdict(c) for c in checks],
                          "agent": report}, indent=1, sort_keys=True, default=str))
    else:
        sys.stdout.write(render(checks, node))
    return 1 if overall(checks) == FAIL else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="this node's health: datastore, dataplane, BGP, IPAM, policy (OK/WARN/FAIL)")
    p.add_argument("--url", default=None,
                   help="the agent's health server (default: http://$FELIX_HEALTHHOST:$FELIX_HEALTHPORT, 9099)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--no-datastore-check", action="store_true",
                   help="do not check from here that the datastore answers")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    datastore_args(p)
    p.set_defaults(func=cmd_status)
