#!/usr/bin/python3 -IS
"""felixpy's CNI executable (installed as ``calico`` and ``calico-ipam``).

The container runtime executes this file for every pod ADD/DEL/CHECK. It must start fast, so it imports
only interpreter built-ins (``_socket``, ``posix``, ``sys``: no ``json``, no ``socket`` module, no ``os``,
whose pure-Python import alone costs about 1 ms, no site) and
forwards the raw request to the warm felixpy agent over a root-only unix socket. The agent does all the
work (IPAM, veth, routes, datastore) and answers with the exit code and the bytes to print.

Wire format (one request per connection):
  request:  b"FXCNI1 <plugin> <len(env)> <len(stdin)>\\n" + env + stdin
            env = b"\\0".join(b"KEY=VALUE") for the CNI_* variables
  response: b"<exit code>\\n" + stdout bytes

The agent socket is taken from the config's ``"felixpy_socket"`` key (Calico ignores unknown keys), then
``$FELIXPY_CNI_SOCKET``, then the default below. ``install-cni`` rewrites the shebang to the host's python.
"""

import _socket
import posix
import sys

DEFAULT_SOCKET = "/var/run/calico/felixpy-cni.sock"
TIMEOUT_S = 240.0  # kubelet's own CNI timeout is longer; the agent answers well before this
ENV_KEYS = (b"CNI_COMMAND", b"CNI_CONTAINERID", b"CNI_NETNS", b"CNI_IFNAME", b"CNI_ARGS", b"CNI_PATH")
VERSIONS = b'["0.1.0","0.2.0","0.3.0","0.3.1","0.4.0","1.0.0"]'


def _json_str_field(raw: bytes, key: bytes) -> str:
    """Value of a top-level-looking string field, without a JSON parser (startup cost matters here).

    Handles the escapes a path or version can contain; on anything unusual returns "" and the caller
    falls back to defaults (the agent parses the config properly).
    """
    i = raw.find(b'"' + key + b'"')
    if i < 0:
        return ""
    i = raw.find(b":", i + len(key) + 2)
    if i < 0:
        return ""
    i += 1
    while i < len(raw) and raw[i] in b" \t\r\n":
        i += 1
    if i >= len(raw) or raw[i] != 0x22:
        return ""
    j = raw.find(b'"', i + 1)
    val = raw[i + 1 : j] if j > 0 else b""
    if b"\\" in val:
        return ""
    return val.decode("utf-8", "replace")


def _error(code: int, msg: str, version: str) -> bytes:
    esc = msg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    return f'{{"cniVersion":"{version or "1.0.0"}","code":{code},"msg":"{esc}"}}'.encode()


def _recv_all(sock: "_socket.socket") -> bytes:
    chunks: list[bytes] = []
    while True:
        b = sock.recv(65536)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def main() -> int:
    stdin = sys.stdin.buffer.read()
    env = posix.environ  # bytes -> bytes
    plugin = sys.argv[0].rpartition("/")[2] or "calico"
    if env.get(b"CNI_COMMAND") == b"VERSION":
        # Answered locally: podman calls VERSION on every plugin of every config, often.
        sys.stdout.buffer.write(b'{"cniVersion":"1.0.0","supportedVersions":' + VERSIONS + b"}")
        return 0
    path = (_json_str_field(stdin, b"felixpy_socket") or env.get(b"FELIXPY_CNI_SOCKET", b"").decode("utf-8", "replace")
            or DEFAULT_SOCKET)
    envb = b"\0".join(k + b"=" + env.get(k, b"") for k in ENV_KEYS)
    header = f"FXCNI1 {plugin.replace(' ', '_')} {len(envb)} {len(stdin)}\n".encode()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    try:
        sock.connect(path)
        sock.sendall(header + envb + stdin)
        sock.shutdown(_socket.SHUT_WR)
        resp = _recv_all(sock)
    except OSError as e:
        version = _json_str_field(stdin, b"cniVersion")
        detail = e.strerror or str(e)
        sys.stdout.buffer.write(_error(
            11, f"felixpy agent is not reachable at {path} ({detail}): check that the felixpy node agent is "
            "running on this node", version))
        return 1
    finally:
        sock.close()
    nl = resp.find(b"\n")
    if nl < 0 or not resp[:nl].lstrip(b"-").isdigit():
        version = _json_str_field(stdin, b"cniVersion")
        sys.stdout.buffer.write(_error(999, "felixpy agent closed the connection without an answer", version))
        return 1
    sys.stdout.buffer.write(resp[nl + 1 :])
    return int(resp[:nl])


if __name__ == "__main__":
    sys.exit(main())
