"""The ``felixpy`` command: ``agent``, ``install-cni``, ``lab up|down`` (CLI verbs grow with later issues)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="felixpy", description="Calico-compatible node networking agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("agent", help="run the node agent (configured by calico-node's environment variables)")
    inst = sub.add_parser("install-cni", help="install the CNI executables and conflist (init container)")
    inst.add_argument("--host-root", default="/host", help="where the host filesystem is mounted")
    inst.add_argument("--bin-dir", default=None)
    inst.add_argument("--net-dir", default=None)
    inst.add_argument("--kubeconfig-from", default="", help="kubeconfig file to copy for the CNI plugin")
    lab = sub.add_parser("lab", help="a one-node lab on this machine (local etcd, agent, two pods)")
    lab_sub = lab.add_subparsers(dest="lab_cmd", required=True)
    up = lab_sub.add_parser("up")
    up.add_argument("--pods", type=int, default=2)
    up.add_argument("--pool", default="10.244.0.0/16")
    lab_sub.add_parser("down")
    lab_sub.add_parser("status")
    args = p.parse_args(argv)

    if args.cmd == "agent":
        from felixpy import config
        from felixpy.daemon import run_agent

        try:
            cfg = config.load()
        except config.ConfigError as e:
            print(f"felixpy: invalid configuration: {e}", file=sys.stderr)
            return 2
        return run_agent(cfg)
    if args.cmd == "install-cni":
        from cni_plugin.install import InstallError, run_install

        kc = Path(args.kubeconfig_from).read_text() if args.kubeconfig_from else ""
        try:
            res = run_install(os.environ, host_root=Path(args.host_root),
                              bin_dir=Path(args.bin_dir) if args.bin_dir else None,
                              net_dir=Path(args.net_dir) if args.net_dir else None, kubeconfig=kc)
        except InstallError as e:
            print(f"install-cni: {e}", file=sys.stderr)
            return 1
        print(json.dumps(res))
        return 0
    if args.cmd == "lab":
        from felixpy import lab as lab_mod

        if args.lab_cmd == "up":
            return lab_mod.up(pods=args.pods, pool=args.pool)
        if args.lab_cmd == "down":
            return lab_mod.down()
        return lab_mod.status()
    return 2


if __name__ == "__main__":
    sys.exit(main())
