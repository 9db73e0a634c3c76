# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Installed once per change of the packaging files.  Compat editable mode
# keeps twisted/plugins visible to twistd while the code stays editable.
STAMP  := $(VENV)/.installed

.PHONY: demo test clean bench bench-profile lab lab-tools vendor browser screenshot postgres

# The dashboard's chart library, uPlot, from the npm registry at the version
# and integrity hash of package-lock.json, copied into the package (which
# ships and serves it): built here, never committed.
VENDOR := meter/cloud/web/static/vendor
UPLOT  := node_modules/uplot/dist

$(STAMP): setup.cfg pyproject.toml $(VENDOR)/.copied
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check \
		--config-settings editable_mode=compat -e '.[test]'
	touch $@

# DEMO_ARGS passes options, e.g. make demo DEMO_ARGS=--keep (the dashboard stays up).
demo: $(STAMP)
	$(BIN)/meter demo $(DEMO_ARGS)

test: $(STAMP) lab-tools browser postgres
	$(BIN)/python -m pytest

vendor: $(VENDOR)/.copied

$(VENDOR)/.copied: package.json package-lock.json
	@command -v npm >/dev/null 2>&1 || { echo "npm is needed to install the dashboard's chart library (Debian: apt-get install npm)" >&2; exit 1; }
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	mkdir -p $(VENDOR)
	cp $(UPLOT)/uPlot.iife.min.js $(UPLOT)/uPlot.min.css $(VENDOR)/
	touch $@

# The dashboard's browser test (tests/test_dashboard.py) needs Chromium and
# its driver: installed here when running as root (as CI does) and missing;
# otherwise that test skips.
browser:
	@if [ "$$(id -u)" = 0 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			echo "installing chromium and chromium-driver for the dashboard's browser test"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
		else \
			echo "no apt-get here: install chromium and chromium-driver for the browser test" >&2; \
		fi; \
	fi

# The PostgreSQL tests (the cloud's store, its faults) start throwaway
# clusters of Debian's server binaries (meter/tools/pgcluster.py): installed
# here when running as root (as CI does) and missing; otherwise they skip.
postgres:
	@if [ "$$(id -u)" = 0 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			echo "installing postgresql for the cloud's PostgreSQL tests"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends postgresql; \
		else \
			echo "no apt-get here: install postgresql for the PostgreSQL tests" >&2; \
		fi; \
	fi

# docs/dashboard.png, the README's picture: the demo's day in the dashboard,
# drawn by headless Chromium.
screenshot: $(STAMP) browser
	$(BIN)/python -m meter.tools.screenshot docs/dashboard.png

# The lab (docs/lab.md): the report's two subnets in network namespaces.
# Run as root; LAB_ARGS passes options, e.g. make lab LAB_ARGS='--devices 20 --loss 20'.
lab: $(STAMP) lab-tools
	$(BIN)/meter lab $(LAB_ARGS)

# The lab and its tests need iproute2 and nftables: installed here when
# running as root (as CI does) and missing; otherwise the lab tests skip.
lab-tools:
	@if [ "$$(id -u)" = 0 ] && ! { command -v ip && command -v nft; } >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			echo "installing iproute2 and nftables for the lab"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends iproute2 nftables; \
		else \
			echo "no apt-get here: install iproute2 and nftables for the lab" >&2; \
		fi; \
	fi

# Speed and scale, measured (docs/performance.md): the real gateway and cloud
# on 127.0.0.1 driven by `meter loadgen`, against raw UDP and SQLite ceilings;
# a few minutes at most.  BENCH_ARGS passes options, e.g.
# make bench BENCH_ARGS='--devices 10000'; bench-profile adds py-spy.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-profile: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check 'py-spy >= 0.3'
	$(BIN)/python bench/run.py --profile $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info twisted/plugins/dropin.cache node_modules $(VENDOR)
