# One image for the agent, the CNI installer (init container) and the ExaBGP sidecar.
# Debian 12 base: the agent uses Debian's python3 and its python3-nftables binding, iproute2 and
# nftables/iptables userspace; nothing is compiled.
FROM debian:bookworm-slim

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-nftables iproute2 nftables iptables ipset conntrack kmod \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/felixpy
COPY pyproject.toml README.md ./
COPY felixpy ./felixpy
COPY bgp ./bgp
COPY cni_plugin ./cni_plugin
RUN python3 -m venv --system-site-packages /opt/felixpy/venv \
 && /opt/felixpy/venv/bin/pip install --no-cache-dir . \
 && /opt/felixpy/venv/bin/pip install --no-cache-dir "exabgp>=5,<6" \
 && rm -rf /root/.cache

ENV PATH=/opt/felixpy/venv/bin:$PATH
# Agent: `felixpy agent`; init container: `felixpy install-cni`; sidecar: `exabgp` (configured by the agent).
ENTRYPOINT ["felixpy"]
CMD ["agent"]
