"""deploy/grafana-dashboard.json: valid dashboard JSON, and every series an expression names is one the agent
exports (a renamed metric would silently empty a panel)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from felixpy import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
PROMQL_WORDS = {"sum", "by", "rate", "increase", "max", "min", "count", "histogram_quantile", "clamp_min", "le",
                "without", "avg", "irate", "on", "ignoring", "label_values"}


def _panels(d: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def _series_names(expr: str) -> set[str]:
    no_labels = re.sub(r"\{[^}]*\}", "", expr)  # label matchers hold strings, not series names
    no_ranges = re.sub(r"\[[^\]]*\]", "", no_labels)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_ranges))
    return {w for w in words if w.startswith(("felix_", "felixpy_"))}


def test_dashboard_is_valid_and_uses_exported_metrics() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    panels = _panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exported = metrics.exported_names()
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = _series_names(expr)
        assert names, f"expression names no felix metric: {expr}"
        missing = names - exported
        assert not missing, f"{expr}: not exported by the agent: {sorted(missing)}"
        used |= names
    for p in panels:
        assert {"type", "title", "gridPos"} <= p.keys()
    # The headline series of this work are on the dashboard.
    for want in ("felixpy_time_to_policy_seconds_bucket", "felix_int_dataplane_apply_time_seconds_sum",
                 "felixpy_bgp_peer_established", "felixpy_ipam_pool_addresses", "felix_active_local_endpoints"):
        assert want in used


def test_series_name_extraction() -> None:
    assert _series_names('rate(felix_x_total{a="felix_not_me"}[5m]) / felixpy_y') == {"felix_x_total", "felixpy_y"}
