# pvtap: `pvtap run` (mitmproxy with the Enphase addon, and the TCP relay) as a non-root user.
# Built by compose.yaml (`docker compose up -d`); see README.md "Full stack".
#
# The base is pinned to a patch release of Python 3.12 (mitmproxy 12.2 needs 3.12); every
# dependency ships a manylinux wheel, so no compiler is needed.
FROM python:3.12.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# tzdata: the AlphaESS clock is read in the house's zone (TZ, passed through by compose.yaml)
RUN apt-get update \
    && apt-get install -y --no-install-recommends tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/pvtap --shell /usr/sbin/nologin pvtap \
    && install -d -o pvtap -g pvtap -m 0700 /var/lib/pvtap /var/lib/pvtap/data /var/lib/pvtap/data/certs

# pvtap runs from its source tree (the addon is a file mitmdump loads): an editable install.
# The dependencies first, so a code change does not re-download them.
WORKDIR /opt/pvtap
COPY pyproject.toml README.md ./
RUN python -m venv /opt/venv \
    && mkdir pvtap proxy_tcp addons && touch pvtap/__init__.py proxy_tcp/__init__.py \
    && pip install -e . \
    && rm -rf pvtap proxy_tcp addons
COPY pvtap ./pvtap
COPY proxy_tcp ./proxy_tcp
COPY addons ./addons
RUN pip install --no-deps -e . && pip check && python -m compileall -q pvtap proxy_tcp addons

USER pvtap
ENV HOME=/var/lib/pvtap \
    PVTAP_DATA_DIR=/var/lib/pvtap/data
WORKDIR /var/lib/pvtap

# Ready: listeners up, store writable, forwarder not stuck (pvtap health asks both processes).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["pvtap", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["pvtap"]
CMD ["run"]
