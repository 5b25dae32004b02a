"""``felixpy ipam show|check|release``: calicoctl's IPAM verbs, with the same output shapes.

* ``show``: pool (and ``--show-blocks`` block) utilisation, ``--ip``, ``--show-borrowed``,
  ``--show-configuration`` (calicoctl ``commands/ipam/show.go``, the 5-column table of v3.31 and earlier).
* ``check``: cross-checks IPAM against workloads, nodes and handles and writes calicoctl's report shape
  (see :mod:`felixpy.ipam.check`).
* ``release``: ``--from-report`` (one or more reports; only addresses unused in all of them) or ``--ip``;
  every address is re-validated on a fresh read before a compare-and-swap release, and an address in use
  is refused (see :mod:`felixpy.ipam.release`). Exit code 1 when any address was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from felixpy.ctl import datastore_args, open_backend
from felixpy.datastore.api import KIND_IPAM_BLOCK, KIND_IPPOOL, Backend, DatastoreError, Resource
from felixpy.ipam.block import Block, format_time
from felixpy.ipam.check import Allocation, format_check
from felixpy.ipam.errors import InvalidBlockError, IPAMError

# -- pure formatting --------------------------------------------------------------------------------


def _numeric(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _centre(text: str, width: int) -> str:
    # tablewriter puts the odd space on the right (str.center may put it on the left).
    left = (width - len(text)) // 2
    return " " * left + text + " " * (width - len(text) - left)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A bordered table as calicoctl's tablewriter draws it: headers centred, numbers right-aligned."""
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [sep, "|" + "|".join(f" {_centre(h, w)} " for h, w in zip(headers, widths, strict=True)) + "|", sep]
    for r in rows:
        cells = [c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True)]
        lines.append("|" + "|".join(f" {c} " for c in cells) + "|")
    lines.append(sep)
    return "\n".join(lines)


def go_g5(n: float) -> str:
    """Go's ``%.5g`` (Python's agrees except for the exponent's digits, which both write as 2+)."""
    return f"{n:.5g}"


def with_pct(n: int, capacity: int) -> str:
    pct = 100.0 * n / capacity if capacity else 0.0
    return f"{go_g5(n)} ({pct:.0f}%)"


Usage = tuple[str, int, int, list[tuple[str, int, int]]]


def utilisation(pools: Sequence[Resource], blocks: Sequence[Resource]) -> list[Usage]:
    """[(pool cidr or "" for blocks outside every pool, capacity, in use, [(block, capacity, in use)])], as
    calicoctl's GetUtilization: pools sorted by address, blocks by address within their pool."""
    nets = []
    for p in pools:
        spec = p.get("spec") or {}
        with contextlib.suppress(ValueError):
            nets.append(ipaddress.ip_network(str(spec.get("cidr", "")), strict=False))
    nets = sorted(set(nets), key=lambda n: (n.version, n.network_address, n.prefixlen))
    parsed: list[Block] = []
    for b in blocks:
        spec = b.get("spec") or {}
        if spec.get("deleted"):
            continue
        with contextlib.suppress(InvalidBlockError):
            parsed.append(Block.from_spec(spec))
    parsed.sort(key=lambda b: (b.cidr.version, b.cidr.network_address))
    out: list[Usage] = []
    placed: set[str] = set()
    for net in nets:
        rows = []
        for blk in parsed:
            if blk.cidr.version == net.version and blk.cidr.subnet_of(net):  # type: ignore[arg-type]
                rows.append((str(blk.cidr), blk.size, len(blk.allocated_ordinals())))
                placed.add(str(blk.cidr))
        out.append((str(net), net.num_addresses, sum(r[2] for r in rows), rows))
    orphans = [(str(x.cidr), x.size, len(x.allocated_ordinals())) for x in parsed if str(x.cidr) not in placed]
    if orphans:
        out.append(("", sum(r[1] for r in orphans), sum(r[2] for r in orphans), orphans))
    return out


def format_show(pools: Sequence[Resource], blocks: Sequence[Resource], *, show_blocks: bool) -> str:
    rows: list[list[str]] = []
    for cidr, cap, used, brows in utilisation(pools, blocks):
        if cidr:
            rows.append(["IP Pool", cidr, go_g5(cap), with_pct(used, cap), with_pct(cap - used, cap)])
        if show_blocks:
            rows += [["Block", c, go_g5(bc), with_pct(bu, bc), with_pct(bc - bu, bc)] for c, bc, bu in brows]
    return render_table(["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"], rows)


def format_ip(ip: str, blocks: Sequence[Resource]) -> str:
    addr = ipaddress.ip_address(ip)
    for res in blocks:
        spec = res.get("spec") or {}
        if spec.get("deleted"):
            continue
        try:
            b = Block.from_spec(spec)
        except InvalidBlockError:
            continue
        if b.cidr.version != addr.version or addr not in b.cidr:
            continue
        o = b.ip_to_ordinal(addr)
        attrs = b.attrs_of(o)
        if attrs is None:
            break
        lines = [f"IP {addr} is in use", f"Handle ID: {b.handle_of(o) or '<none>'}"]
        if attrs:
            lines.append("Attributes:")
            lines += [f"  {k}: {v}" for k, v in sorted(attrs.items())]
        else:
            lines.append("No attributes defined")
        return "\n".join(lines)
    return f"{addr} is not assigned"


def format_borrowed(blocks: Sequence[Resource]) -> str:
    rows: list[list[str]] = []
    unclassified = 0
    for res in blocks:
        spec = res.get("spec") or {}
        try:
            b = Block.from_spec(spec)
        except InvalidBlockError:
            continue
        owner = b.host or (b.affinity or "")
        for o in b.allocated_ordinals():
            attrs = b.attrs_of(o) or {}
            node = attrs.get("node")
            if node is None:
                unclassified += 1
                continue
            if node == owner:
                continue
            ns = attrs.get("namespace", "")
            if "pod" in attrs:
                typ, to = "pod", f"{ns}/{attrs['pod']}"
            else:
                typ, to = attrs.get("type", ""), ""
            rows.append([str(b.ordinal_to_ip(o)), node, str(b.cidr), owner, typ, to])
    text = render_table(["IP", "BORROWING-NODE", "BLOCK", "BLOCK OWNER", "TYPE", "ALLOCATED-TO"], rows)
    if unclassified:
        text += (f"\n\nNote: found {unclassified} IP allocations without an explicit node association. "
                 "Unable to determine if they are borrowed.")
    return text


# -- commands ---------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, fn: Callable[[Backend], Awaitable[int]]) -> int:
    async def go() -> int:
        backend = await open_backend(args)
        try:
            return await fn(backend)
        finally:
            await backend.close()

    try:
        return asyncio.run(go())
    except DatastoreError as e:
        print(f"felixpy ipam: datastore error: {e}", file=sys.stderr)
        return 1
    except (IPAMError, ValueError) as e:
        print(f"felixpy ipam: {e}", file=sys.stderr)
        return 1


def cmd_show(args: argparse.Namespace) -> int:
    if args.ip:
        try:
            ipaddress.ip_address(args.ip)
        except ValueError:
            print(f"felixpy ipam show: invalid IP address {args.ip!r}", file=sys.stderr)
            return 1

    async def go(b: Backend) -> int:
        blocks = [kv.value for kv in (await b.list(KIND_IPAM_BLOCK)).items]
        if args.ip:
            print(format_ip(args.ip, blocks))
        elif args.show_borrowed:
            print(format_borrowed(blocks))
        elif args.show_configuration:
            from felixpy.datastore.api import KIND_IPAM_CONFIG, Key, NotFound
            from felixpy.ipam.client import IPAM_CONFIG_NAME, IPAMConfig, parse_ipam_config

            cfg = IPAMConfig()  # Calico's defaults when none is stored (a read-only verb creates nothing)
            with contextlib.suppress(NotFound):
                cfg = parse_ipam_config((await b.get(Key(KIND_IPAM_CONFIG, IPAM_CONFIG_NAME))).value)
            print(render_table(["PROPERTY", "VALUE"], [["StrictAffinity", str(cfg.strict_affinity).lower()],
                                                       ["AutoAllocateBlocks", str(cfg.auto_allocate_blocks).lower()],
                                                       ["MaxBlocksPerHost", str(cfg.max_blocks_per_host)]]))
        else:
            pools = [kv.value for kv in (await b.list(KIND_IPPOOL)).items]
            print(format_show(pools, blocks, show_blocks=args.show_blocks))
        return 0

    return _run(args, go)


def cmd_check(args: argparse.Namespace) -> int:
    from felixpy.ipam.release import load_snapshot

    async def go(b: Backend) -> int:
        snap = await load_snapshot(b)
        an = snap.analyse()
        for line in format_check(an, show_all_ips=args.show_all_ips, show_problem_ips=args.show_problem_ips):
            print(line)
        if args.output:
            report = an.report(cluster_info=snap.cluster_info.value if snap.cluster_info else None,
                               revision=snap.cluster_info.revision if snap.cluster_info else "",
                               generated_at=format_time(time.time()))
            tmp = Path(f"{args.output}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.replace(args.output)  # whole or not at all: release must never read half a report
            print(f"Report written to {args.output}")
        return 0

    return _run(args, go)


def load_report(path: str) -> tuple[dict[str, Any], float]:
    """(report, when it was generated); ``generatedAt`` or, for a calicoctl report, the file's mtime."""
    from felixpy.ipam.block import parse_time
    from felixpy.ipam.release import ReportError

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ReportError(f"cannot read report {path}: {e}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as e:
        raise ReportError(f"report {path} is not JSON: {e}") from None
    if not isinstance(report, dict):
        raise ReportError(f"report {path} is not a JSON object")
    when = parse_time(str(report.get("generatedAt") or "")) or Path(path).stat().st_mtime
    return report, when


def cmd_release(args: argparse.Namespace) -> int:
    from felixpy.ipam.release import (
        Releaser,
        ReportError,
        candidates,
        check_report_usable,
        leaked_handles,
        load_snapshot,
    )

    if not args.ip and not args.from_report:
        print("felixpy ipam release: give --ip or --from-report", file=sys.stderr)
        return 2
    if args.ip:
        try:
            ipaddress.ip_address(args.ip)
        except ValueError:
            print(f"felixpy ipam release: invalid IP address {args.ip!r}", file=sys.stderr)
            return 1
    try:
        reports = [load_report(p) for p in args.from_report or []]
        wanted_sets = [candidates(r) for r, _ in reports]
        handle_sets = [leaked_handles(r) for r, _ in reports]
    except ReportError as e:
        print(f"felixpy ipam release: {e}", file=sys.stderr)
        return 1

    async def go(b: Backend) -> int:
        now = time.time()
        rel = Releaser(b, now=now, min_age=args.min_age)
        if args.ip:
            (o,) = await rel.release_ips({args.ip: None})
            if o.released:
                print(f"Successfully released IP address {args.ip}")
                return 0
            print(o.reason if not o.refused else f"Error: {o.reason}", file=sys.stderr)
            return 1
        snap = await load_snapshot(b)
        try:
            for (r, when), path in zip(reports, args.from_report, strict=True):
                try:
                    check_report_usable(r, report_time=when, now=now, min_age=args.min_age,
                                        cluster_info=snap.cluster_info)
                except ReportError as e:
                    raise ReportError(f"{path}: {e}") from None
        except ReportError as e:
            print(f"felixpy ipam release: {e}", file=sys.stderr)
            return 1
        wanted = intersect(wanted_sets)
        refused = 0
        if wanted:
            print(f"Releasing {len(wanted)} old IPs...")
            outcomes = await rel.release_ips(dict(wanted))
            for o in outcomes:
                if not o.released:
                    print(f"  {o.reason}")
            done = sum(o.released for o in outcomes)
            gone = sum(1 for o in outcomes if not o.released and not o.refused)
            refused = sum(o.refused for o in outcomes)
            print(f"Released {done} IPs successfully")
            if gone:
                print(f"{gone} addresses marked as leaked in the report had already been cleaned up.")
            if refused:
                print(f"Refused to release {refused} addresses (in use, or changed since the report).")
        else:
            print("Report didn't contain any leaked IPs to clean up.")
        handles = intersect_handles(handle_sets)
        if handles:
            fresh = (await load_snapshot(b)).analyse()
            used = {a.handle for allocs in fresh.allocations.values() for a in allocs if a.handle}
            print(f"Deleting {len(handles)} handles...")
            res = await rel.release_handles(handles, used)
            for hid, ok, why in res:
                if not ok:
                    print(f"  skipped handle {hid}: {why}")
            n_ok = sum(ok for _, ok, _ in res)
            print(f"Released {n_ok} handles; {len(res) - n_ok} skipped; 0 errors.")
        else:
            print("Report didn't contain any handles to clean up.")
        return 1 if refused else 0

    return _run(args, go)


def intersect(sets: Sequence[dict[str, Allocation]]) -> dict[str, Allocation]:
    """Addresses unused in every report, with the same handle and sequence number in each (calicoctl's
    mergeReports, stricter: a different allocation of the same address is not the same leak)."""
    if not sets:
        return {}
    out = dict(sets[0])
    for s in sets[1:]:
        out = {ip: a for ip, a in out.items() if ip in s and s[ip].handle == a.handle
               and s[ip].sequence_number == a.sequence_number}
    return out


def intersect_handles(sets: Sequence[Any]) -> list[Any]:
    if not sets:
        return []
    out = {h.id: h for h in sets[0]}
    for s in sets[1:]:
        ids = {h.id: h for h in s}
        out = {i: h for i, h in out.items() if i in ids and ids[i].revision == h.revision}
    return list(out.values())


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from felixpy.ipam.release import DEFAULT_MIN_AGE

    ipam = sub.add_parser("ipam", help="IP address management (calicoctl ipam)")
    isub = ipam.add_subparsers(dest="ipam_cmd", required=True)
    show = isub.add_parser("show", help="IP pool/block utilisation, or one address")
    datastore_args(show)
    g = show.add_mutually_exclusive_group()
    g.add_argument("--ip", help="report whether this address is in use, and by what")
    g.add_argument("--show-borrowed", action="store_true", help="addresses borrowed from other nodes' blocks")
    g.add_argument("--show-configuration", action="store_true", help="the IPAMConfig settings")
    show.add_argument("--show-blocks", action="store_true", help="one row per block as well")
    show.set_defaults(func=cmd_show)

    check = isub.add_parser("check", help="find leaked addresses and inconsistent IPAM data")
    datastore_args(check)
    check.add_argument("-o", "--output", help="write a JSON report (input for `ipam release --from-report`)")
    check.add_argument("--show-all-ips", action="store_true", help="print every address checked")
    check.add_argument("--show-problem-ips", action="store_true", help="print the addresses with problems")
    check.set_defaults(func=cmd_check)

    rel = isub.add_parser("release", help="release leaked addresses (never one in use)")
    datastore_args(rel)
    rel.add_argument("--ip", help="release this address (refused if a workload or node uses it)")
    rel.add_argument("--from-report", action="append", metavar="REPORT",
                     help="release what the report(s) found leaked; repeat for several reports (only addresses "
                          "leaked in all of them are released)")
    rel.add_argument("--min-age", type=float, default=DEFAULT_MIN_AGE, metavar="SECONDS",
                     help="minimum age of the report and of each allocation (default %(default)g)")
    rel.set_defaults(func=cmd_release)
