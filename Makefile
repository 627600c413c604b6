# pvtap — the two commands the README starts with:
#   make run    install into .venv and run pvtap on the embedded local store (./data)
#   make test   install everything the tests need (Python and Debian packages), lint, and run the suite
# and for development:
#   make lint       the static checks alone: ruff and mypy (configured in pyproject.toml)
#   make test-fast  the tests not marked slow, without lint
#   make bench      every benchmark, about 10 minutes; writes docs/benchmarks.md (run it on a quiet machine)
.PHONY: run test test-fast lint install debian-packages demo clean bench

PYTHON ?= $(shell scripts/find-python)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# real servers and tools the tests drive (socat: bench/relay.py compares against it; tcpdump: the
# `pvtap import` tests capture the simulators' traffic with it; mosquitto: the MQTT broker; prometheus
# scrapes /metrics; docker-compose parses compose.yaml; chromium: the web view's browser tests, driven by
# Playwright from the venv, which downloads no browser of its own)
DEBIAN_PACKAGES := influxdb victoria-metrics iptables nftables iproute2 socat tcpdump mosquitto mosquitto-clients \
	prometheus docker-compose chromium

run: install
	$(VENV)/bin/pvtap run

demo: install
	$(VENV)/bin/pvtap demo

install: $(VENV)/.installed

# One pip command for everything: mitmproxy and influxdb-client must resolve together.
$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { scripts/find-python >/dev/null; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip check
	touch $@

debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Zero findings or make fails (CI runs `make test`). mypy's cache lives in .mypy_cache: the
# first run checks everything (some 20 s), later ones only what changed.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# pytest exits 5 when it collected no test (with pytest-xdist too): make fails on it, so an empty
# run never passes. Two workers, each taking whole test files (module fixtures start once): on the
# 2-core CI machine the suite took 415 s instead of 718 s. PYTEST_JOBS=0 runs it in one process.
PYTEST_JOBS ?= 2
test: install lint debian-packages
	$(PY) -m pytest -n $(PYTEST_JOBS) --dist loadfile

bench: install debian-packages
	$(PY) bench/all.py --out docs/benchmarks.md

test-fast: install
	$(PY) -m pytest -m "not slow" -n $(PYTEST_JOBS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
