"""The ``felixpy`` command: ``agent``, ``install-cni``, ``lab``, ``bgp-sidecar``, ``route-reflector``, and the
calicoctl-style verbs in :mod:`felixpy.ctl`."""

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
    lab = sub.add_parser("lab", help="a multi-node lab on this machine (see `felixpy lab --help`)", add_help=False)
    lab.add_argument("lab_args", nargs=argparse.REMAINDER)
    sc = sub.add_parser("bgp-sidecar", help="supervise the ExaBGP sidecar (runs the config the agent writes)")
    sc.add_argument("--dir", default=os.environ.get("FELIXPY_BGP_DIR", "/var/run/calico/bgp"))
    sub.add_parser("route-reflector", help="run a BIRD route reflector configured from the datastore")
    from felixpy.ctl import register_all

    register_all(sub)
    args = p.parse_args(argv)
    if getattr(args, "func", None) is not None:
        rc: int = args.func(args)
        return rc

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

        return lab_mod.main(list(args.lab_args))
    if args.cmd == "bgp-sidecar":
        from bgp.sidecar import main as sidecar_main

        return sidecar_main(["--dir", args.dir])
    if args.cmd == "route-reflector":
        from felixpy.rrcmd import run_route_reflector_cmd

        return run_route_reflector_cmd()
    return 2


if __name__ == "__main__":
    sys.exit(main())
