"""``felixpy node status``: calicoctl's node status, on the node, from the agent's own view.

Source: ``GET http://<FELIX_HEALTHHOST>:<FELIX_HEALTHPORT>/status`` (the agent's health server, 9099 by default;
``0.0.0.0``/empty means this host). That answer says both that the agent runs and what its BGP speaker knows.
Only when the health server is disabled (``FELIX_HEALTHENABLED=false``) the session table the agent refreshes
every 5 s, ``$FELIXPY_BGP_DIR/status.json``, is used instead, and counts as "running" while it is fresh (under
30 s old; with the health server on, the file is never used, as it outlives a crashed agent by that long).
Neither answering means "Calico process is not running." (exit 1, as calicoctl).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_HEALTH_PORT = 9099
DEFAULT_BGP_DIR = "/var/run/calico/bgp"
STATUS_FILE_FRESH = 30.0  # the agent rewrites status.json every 5 s while it runs

PEER_TYPES = {"Mesh": "node-to-node mesh", "Node": "node specific", "Global": "global"}

# RFC 4271 section 4.5 / RFC 4486 (Cease subcodes): the words BIRD prints.
_NOTIFICATION_CODES = {1: "Message header error", 2: "OPEN message error", 3: "UPDATE message error",
                       4: "Hold timer expired", 5: "Finite state machine error", 6: "Cease"}
_NOTIFICATION_SUBCODES = {
    (1, 1): "Connection not synchronized", (1, 2): "Bad message length", (1, 3): "Bad message type",
    (2, 1): "Unsupported version number", (2, 2): "Bad peer AS", (2, 3): "Bad BGP identifier",
    (2, 4): "Unsupported optional parameter", (2, 6): "Unacceptable hold time", (2, 7): "Unsupported capability",
    (6, 1): "Maximum number of prefixes reached", (6, 2): "Administrative shutdown", (6, 3): "Peer de-configured",
    (6, 4): "Administrative reset", (6, 5): "Connection rejected", (6, 6): "Other configuration change",
    (6, 7): "Connection collision resolution", (6, 8): "Out of resources", (6, 9): "Hard reset",
}
_NOTIFICATION_RE = re.compile(r"notification (sent|received|exchanged) \((\d+),(\d+)\)\s*(.*)")


class AgentUnreachable(Exception):
    pass


# -- where the agent is -----------------------------------------------------------------------------------
def _env(env: Mapping[str, str], name: str, default: str = "") -> str:
    """FELIX_* settings are case-insensitive, as for the agent."""
    for k, v in env.items():
        if k.upper() == name:
            return v
    return default


def agent_url(env: Mapping[str, str] | None = None) -> str:
    e = os.environ if env is None else env
    host = _env(e, "FELIX_HEALTHHOST", "localhost")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    port = _env(e, "FELIX_HEALTHPORT", str(DEFAULT_HEALTH_PORT)) or str(DEFAULT_HEALTH_PORT)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def fetch_agent_status(url: str, timeout: float = 3.0) -> dict[str, Any]:
    """The agent's ``/status`` JSON; raises :class:`AgentUnreachable` with the reason."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AgentUnreachable(f"{url}/status answered {e.code}") from None
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: not JSON
        raise AgentUnreachable(f"{url}/status: {getattr(e, 'reason', e)}") from None
    if not isinstance(data, dict):
        raise AgentUnreachable(f"{url}/status: not a JSON object")
    return data


def read_status_file(bgp_dir: str, *, now: float | None = None) -> dict[str, Any] | None:
    """``status.json`` if the agent wrote it within :data:`STATUS_FILE_FRESH` seconds, else None."""
    path = os.path.join(bgp_dir, "status.json")
    try:
        if (now if now is not None else time.time()) - os.stat(path).st_mtime > STATUS_FILE_FRESH:
            return None
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- presentation (pure) ----------------------------------------------------------------------------------
def peer_type(name: str) -> str:
    """Calico's protocol name prefix -> calicoctl's PEER TYPE."""
    return PEER_TYPES.get(name.split("_", 1)[0], "unknown")


def describe_reason(raw: str) -> str:
    """ExaBGP's / the speaker's down reason in BIRD's words ("Error: Hold timer expired")."""
    raw = (raw or "").strip()
    m = _NOTIFICATION_RE.match(raw)
    if m:
        direction, code, sub = m.group(1), int(m.group(2)), int(m.group(3))
        text = _NOTIFICATION_CODES.get(code, f"Notification code {code}")
        if (code, sub) in _NOTIFICATION_SUBCODES:
            text += " / " + _NOTIFICATION_SUBCODES[(code, sub)]
        elif sub:
            text += f" (subcode {sub})"
        extra = m.group(4).strip()
        return f"{'Received' if direction == 'received' else 'Error'}: {text}" + (f" ({extra})" if extra else "")
    if raw == "closing connection":
        return "Socket: Connection closed"
    if re.fullmatch(r"connection to \S+ failed", raw):
        return "Socket: Connection failed"
    if raw == "no connection to ExaBGP":
        return "BGP speaker (ExaBGP) unreachable"
    return raw[:1].upper() + raw[1:]


def format_since(ts: object, *, now: float | None = None) -> str:
    """BIRD's short time: HH:MM:SS when within the last day, else the date."""
    if not isinstance(ts, int | float) or ts <= 0:
        return "-"
    now = time.time() if now is None else now
    lt = time.localtime(ts)
    return time.strftime("%H:%M:%S" if now - ts < 86400 else "%Y-%m-%d", lt)


def peer_row(p: Mapping[str, Any], *, now: float | None = None) -> tuple[str, str, str, str, str]:
    state = str(p.get("state", ""))
    reason = describe_reason(str(p.get("info") or ""))
    if state == "established":
        st, info = "up", "Established"
    elif state == "connect":
        st, info = "start", "Connect"
    elif state == "down":
        st, info = "start", "Active"
    elif state == "idle":
        st, info = "start", "Idle"
    else:
        st, info = state or "?", state.capitalize()
    if reason and state != "established":
        info += f" {reason}"
    if p.get("stale"):
        info += " (graceful restart: routes kept)"
    return (str(p.get("address", "?")), peer_type(str(p.get("name", ""))), st, format_since(p.get("since"), now=now),
            info)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A tablewriter-style table (calicoctl's): headers centred, cells left-aligned, one space of padding."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def centre(text: str, w: int) -> str:
        gap = w - len(text)
        return " " * (gap // 2) + text + " " * (gap - gap // 2)

    lines = [sep, "| " + " | ".join(centre(h, w) for h, w in zip(headers, widths, strict=True)) + " |", sep]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    if rows:
        lines.append(sep)
    return "\n".join(lines)


PEER_HEADERS = ("PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO")


def render_node_status(bgp: Mapping[str, Any] | None, *, networking_backend: str = "bird",
                       now: float | None = None) -> str:
    out = ["Calico process is running.", ""]
    if bgp is None:
        out.append(f"The BGP backend is not in use (CALICO_NETWORKING_BACKEND={networking_backend}).")
        return "\n".join(out) + "\n"
    if bgp.get("connected") is False:
        out += ["The BGP backend process (ExaBGP) is not running.", ""]
    peers = [p for p in bgp.get("peers") or [] if isinstance(p, dict)]
    v4 = [p for p in peers if ":" not in str(p.get("address", ""))]
    v6 = [p for p in peers if ":" in str(p.get("address", ""))]
    out.append("IPv4 BGP status")
    out.append(render_table(PEER_HEADERS, [peer_row(p, now=now) for p in v4]) if v4 else "No IPv4 peers found.")
    out += ["", "IPv6 BGP status"]
    out.append(render_table(PEER_HEADERS, [peer_row(p, now=now) for p in v6]) if v6 else "No IPv6 peers found.")
    return "\n".join(out) + "\n"


# -- the verb -----------------------------------------------------------------------------------------------
def cmd_node_status(args: argparse.Namespace) -> int:
    url = args.url or agent_url()
    bgp_dir = args.bgp_dir or os.environ.get("FELIXPY_BGP_DIR", DEFAULT_BGP_DIR)
    backend = "bird"
    try:
        report = fetch_agent_status(url, timeout=args.timeout)
        bgp = report.get("bgp")
        backend = str(report.get("networking_backend") or backend)
        source = url + "/status"
    except AgentUnreachable as e:
        # status.json stays fresh for a while after the agent dies: only trusted when there is no health server.
        health_off = _env(os.environ, "FELIX_HEALTHENABLED", "true").strip().lower() in ("false", "0", "no")
        st = read_status_file(bgp_dir) if health_off and not args.url else None
        if st is None:
            if args.output == "json":
                print(json.dumps({"running": False, "reason": str(e)}))
            else:
                print("Calico process is not running.")
                if args.verbose:
                    print(f"({e}; no fresh {bgp_dir}/status.json)", file=sys.stderr)
            return 1
        bgp, source = st, os.path.join(bgp_dir, "status.json")
    if args.output == "json":
        print(json.dumps({"running": True, "source": source, "bgp": bgp}, indent=1, sort_keys=True))
    else:
        sys.stdout.write(render_node_status(bgp if isinstance(bgp, dict) else None, networking_backend=backend))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    node = sub.add_parser("node", help="this node's agent (node status)")
    nsub = node.add_subparsers(dest="node_cmd", required=True)
    st = nsub.add_parser("status", help="is the agent running, and its BGP sessions (calicoctl node status)")
    st.add_argument("--url", default=None,
                    help="the agent's health server (default: http://$FELIX_HEALTHHOST:$FELIX_HEALTHPORT, 9099)")
    st.add_argument("--bgp-dir", default=None, help="fallback: status.json here (default: $FELIXPY_BGP_DIR)")
    st.add_argument("--timeout", type=float, default=3.0)
    st.add_argument("-o", "--output", choices=("table", "json"), default="table")
    st.add_argument("-v", "--verbose", action="store_true", help="say why the agent counts as not running")
    st.set_defaults(func=cmd_node_status)
