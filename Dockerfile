# gdoid: GDOI (RFC 6407) key server / group member, as a container image.
#
# With no registry (Docker Hub unreachable), build everything locally:
#     compose/build-base.sh          # gdoid-base:bookworm, compose/wheels, gdoid:latest
# which amounts to (wheelhouse built on the host, base image made by debootstrap):
#     pip wheel . setuptools wheel -w compose/wheels
#     docker build --network none --build-arg PIP_NO_INDEX=1 \
#         --build-arg BASE=gdoid-base:bookworm --build-arg WHEELHOUSE=compose/wheels -t gdoid .
# With Docker Hub and a package index reachable (BASE defaults to python:3.11-slim):
#     docker build -t gdoid .
#
# BASE must provide python3.11 with the venv module.  The image ships no
# configuration and no keys: mount them (see docs/deploy.md).  The daemons run
# as the non-root user gdoid (uid 848).  Run-time privileges: a KS, and a GM
# without the data path, need no capability at all: UDP 848 is bound thanks to
# the per-container sysctl net.ipv4.ip_unprivileged_port_start=848 (Docker
# 20.10 gives a non-root user no capabilities, so NET_BIND_SERVICE would not
# help).  A GM with the data path needs NET_ADMIN + NET_RAW and /dev/net/tun:
# it starts as uid 0 with only NET_ADMIN, NET_RAW, SETUID and SETGID, and
# setpriv(1) switches it to gdoid keeping NET_ADMIN + NET_RAW as ambient
# capabilities (compose/lib/as-gdoid.sh, docs/deploy.md).

ARG BASE=python:3.11-slim

# ---------------------------------------------------------------------------
FROM ${BASE} AS builder
# Marks this stage's image, which build-base.sh tags <image>-builder (Docker's
# layer cache for the next build) and prunes once replaced.
LABEL org.gdoid.image=builder
# A folder of wheels inside the build context (dependencies, setuptools, wheel);
# it may be empty when an index is reachable.
ARG WHEELHOUSE=compose/wheels
# 1 = never contact an index (pip reads PIP_NO_INDEX).
ARG PIP_NO_INDEX=
# Zip timestamps of the wheels built here: the same source gives the same wheel,
# so the final stage's COPY --from=builder hits the cache even after a rebuild.
ARG SOURCE_DATE_EPOCH=315532800
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=${PIP_NO_INDEX} PYTHONDONTWRITEBYTECODE=1 \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}
COPY ${WHEELHOUSE}/ /wheelhouse/
COPY pyproject.toml README.md /src/
COPY gdoid/ /src/gdoid/
# Build the gdoid wheel from this source tree and collect every dependency as
# a wheel in /wheels (from the wheelhouse first, then an index if allowed).
RUN set -eu; \
    python3 -m venv /build; \
    /build/bin/pip wheel --find-links /wheelhouse --wheel-dir /wheels /src; \
    if [ -s /wheelhouse/extra-requirements.txt ]; then \
        /build/bin/pip wheel --find-links /wheelhouse --wheel-dir /wheels -r /wheelhouse/extra-requirements.txt; \
        cp /wheelhouse/extra-requirements.txt /wheels/; \
    fi; \
    ls /wheels

# ---------------------------------------------------------------------------
FROM ${BASE}
ARG GDOID_UID=848
LABEL org.gdoid.image=gdoid \
      org.opencontainers.image.title="gdoid" \
      org.opencontainers.image.description="GDOI (RFC 6407) key server and group member, modelled on Cisco GET VPN" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/gdoid/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=builder /wheels/ /tmp/wheels/
# The data directories are owned by gdoid, group root, mode 0770: usable by the
# gdoid user and by uid 0 with every capability dropped (no CAP_DAC_OVERRIDE).
# /run/gdoid is setgid, so the control sockets belong to group root: with
# control_group = "root" (mode 0660) such a capability-less root, e.g. a
# `docker exec` in a GM container, can still run gdoictl.
RUN set -eu; \
    python3 -m venv /opt/gdoid; \
    extra=; [ -s /tmp/wheels/extra-requirements.txt ] && extra="-r /tmp/wheels/extra-requirements.txt"; \
    /opt/gdoid/bin/pip install --no-index --find-links /tmp/wheels --no-compile gdoid $extra; \
    /opt/gdoid/bin/python -m compileall -q /opt/gdoid/lib; \
    rm -rf /tmp/wheels /root/.cache; \
    gdoid --help >/dev/null; \
    groupadd --system --gid ${GDOID_UID} gdoid; \
    useradd --system --uid ${GDOID_UID} --gid gdoid --home-dir /var/lib/gdoid --no-create-home \
        --shell /usr/sbin/nologin gdoid; \
    mkdir -p /etc/gdoid /var/lib/gdoid /run/gdoid; \
    chown gdoid:0 /etc/gdoid /var/lib/gdoid /run/gdoid; \
    chmod 0770 /etc/gdoid /var/lib/gdoid; \
    chmod 2770 /run/gdoid; \
    setpriv --help >/dev/null
VOLUME ["/etc/gdoid", "/var/lib/gdoid", "/run/gdoid"]
USER gdoid
WORKDIR /var/lib/gdoid
EXPOSE 848/udp
# Role-agnostic: gdoictl talks to whichever of /run/gdoid/{ks,gm}.sock exists.
# healthy = does its job (KS listening / COOP role; GM registered in every group,
# routes in place; docs/deploy.md "Health states").  60 s start period: a GM started
# before its KS retries with backoff (2, 4, 8, ... s) and registers within it.
HEALTHCHECK --interval=10s --timeout=10s --start-period=60s --retries=3 \
    CMD ["gdoictl", "--timeout", "5", "health"]
ENTRYPOINT ["gdoid"]
CMD ["--help"]
