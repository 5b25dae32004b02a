# One image for every felixpy container (docs/image.md):
#   agent (DaemonSet main container)   felixpy agent            (the default command)
#   CNI installer (init container)     felixpy install-cni      (needs the host's / mounted at /host)
#   BGP sidecar                        felixpy bgp-sidecar      (supervises `exabgp server`)
#   route reflector                    felixpy route-reflector  (supervises BIRD 2)
# Debian 12: the agent uses Debian's python3 and its python3-nftables binding (not on PyPI), so the venv
# sees the system site-packages. Nothing is compiled: every PyPI dependency comes as a wheel.
# BASE: scripts/build-image.sh passes a locally made bookworm-slim equivalent (no registry needed).
ARG BASE=debian:bookworm-slim

# Build stage: the venv, made with pip, which the runtime stage does not carry.
FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv --system-site-packages /opt/felixpy/venv
WORKDIR /src
# Secret "host-ca" (optional): a CA bundle for pip where PyPI is reached through a TLS-intercepting proxy.
# build-image.sh passes the host's bundle; a secret mount is never stored in a layer. PIP_CERT rather
# than --cert: pip's isolated build-backend install must see it too.
# Dependencies first, from pyproject.toml alone: a code change does not re-download them.
COPY pyproject.toml ./
RUN --mount=type=secret,id=host-ca \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      >/tmp/requirements.txt \
 && if [ -s /run/secrets/host-ca ]; then export PIP_CERT=/run/secrets/host-ca; fi \
 && /opt/felixpy/venv/bin/pip install --no-cache-dir --no-compile --disable-pip-version-check -r /tmp/requirements.txt
COPY README.md ./
COPY felixpy ./felixpy
COPY bgp ./bgp
COPY cni_plugin ./cni_plugin
# Then pip and setuptools leave the venv, and everything is byte-compiled once here (a read-only root
# would otherwise recompile on every start).
RUN --mount=type=secret,id=host-ca \
    if [ -s /run/secrets/host-ca ]; then export PIP_CERT=/run/secrets/host-ca; fi \
 && /opt/felixpy/venv/bin/pip install --no-cache-dir --no-compile --no-deps --disable-pip-version-check . \
 && /opt/felixpy/venv/bin/pip uninstall -y -q --disable-pip-version-check pip setuptools \
 && find /opt/felixpy/venv -depth \( -name tests -o -name __pycache__ \) -type d -path '*/site-packages/*' \
      -exec rm -rf {} + \
 && /opt/felixpy/venv/bin/python -m compileall -q -j 0 /opt/felixpy/venv/lib >/dev/null
# The reference plugins Calico's own image ships for conflists to chain (portmap for hostPort, bandwidth,
# tuning, loopback, host-local); install-cni copies them to the host's /opt/cni/bin (UPDATE_CNI_BINARIES).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends containernetworking-plugins \
 && mkdir -p /opt/felixpy/cni-bin \
 && for p in portmap bandwidth tuning loopback host-local; do cp /usr/lib/cni/$p /opt/felixpy/cni-bin/; done \
 && rm -rf /var/lib/apt/lists/*
# Marks this stage's last image, so build-image.sh can drop the stale ones a code change leaves behind.
LABEL felixpy.stage=build

# Runtime stage.
FROM ${BASE}
# python3-nftables (libnftables) drives nftables; the nft, iptables and ipset CLIs are the fallbacks and
# the iptables backend; bird2 is the route reflector; iproute2 is for operators (`ip route` in the pod).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-nftables nftables iptables ipset iproute2 bird2 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old
COPY --from=build /opt/felixpy/venv /opt/felixpy/venv
COPY --from=build /opt/felixpy/cni-bin /opt/felixpy/cni-bin
ENV PATH=/opt/felixpy/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["felixpy"]
CMD ["agent"]
