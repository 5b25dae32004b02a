"""The thin CNI executable: framing, local VERSION, agent-unreachable error (a real process each time)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import cni_plugin.client as client_mod

CLIENT = Path(client_mod.__file__)


def run_client(env: dict[str, str], stdin: bytes, name: str = "calico") -> tuple[int, bytes]:
    p = subprocess.run([sys.executable, "-I", "-S", str(CLIENT)], input=stdin, capture_output=True,
                       env={"PATH": os.environ.get("PATH", ""), **env}, timeout=30)
    return p.returncode, p.stdout


def test_version_is_answered_without_the_agent() -> None:
    rc, out = run_client({"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0
    assert "1.0.0" in json.loads(out)["supportedVersions"]


def test_unreachable_agent_gives_cni_error_json(tmp_path: Path) -> None:
    sock = tmp_path / "nobody.sock"
    stdin = json.dumps({"cniVersion": "0.4.0", "name": "n", "type": "calico",
                        "felixpy_socket": str(sock)}).encode()
    rc, out = run_client({"CNI_COMMAND": "ADD"}, stdin)
    assert rc == 1
    err = json.loads(out)
    assert err["code"] == 11 and err["cniVersion"] == "0.4.0"
    assert str(sock) in err["msg"] and "not reachable" in err["msg"]


def test_request_framing_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    got: dict[str, object] = {}

    def serve() -> None:
        conn, _ = srv.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        header, _, rest = data.partition(b"\n")
        magic, plugin, elen, slen = header.decode().split()
        got.update(magic=magic, plugin=plugin, env=rest[: int(elen)].split(b"\0"),
                   stdin=rest[int(elen): int(elen) + int(slen)])
        conn.sendall(b'3\n{"answer": true}')
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    stdin = b'{"cniVersion":"1.0.0","name":"x","type":"calico"}'
    rc, out = run_client({"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "abc", "FELIXPY_CNI_SOCKET": path}, stdin)
    t.join(5)
    srv.close()
    assert rc == 3 and out == b'{"answer": true}'
    assert got["magic"] == "FXCNI1" and got["stdin"] == stdin
    assert b"CNI_CONTAINERID=abc" in got["env"] and b"CNI_COMMAND=DEL" in got["env"]  # type: ignore[operator]


def test_client_imports_nothing_heavy() -> None:
    # -X importtime lists every module the executable imports, in the real startup path.
    p = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", str(CLIENT)], input=b"",
                       capture_output=True, env={"CNI_COMMAND": "DEL"}, timeout=30)
    imported = {ln.split("|")[-1].strip() for ln in p.stderr.decode().splitlines() if "|" in ln}
    assert "_socket" in imported  # sanity: the listing works
    for heavy in ("json", "socket", "re", "asyncio", "enum", "felixpy", "cni_plugin"):
        assert heavy not in imported, f"client imports {heavy}"
