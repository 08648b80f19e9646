# Every target creates or updates .venv from uv.lock first, so a fresh clone needs only Python >= 3.11 and make.
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
RUN := $(VENV)/bin

export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install serve test test-browser test-clients lint format migrate bench ha-drill clean

install: $(VENV)/.synced

# uv itself is pinned and kept in its own small venv, so the project venv holds exactly the lock file.
$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

serve: install
	$(RUN)/ledger-service serve

migrate: install
	$(RUN)/ledger-service migrate

test: install
	$(RUN)/pytest

# The web console in headless Chromium (Debian's chromium and chromium-driver; nothing downloads a browser). Skips
# when they are missing, fails instead with LEDGER_TEST_REQUIRE_BROWSER=1 (.ci/run). Screenshots of every page go
# to docs/images/console-*.png and $(or $(LEDGER_TEST_ARTIFACTS),test-artifacts)/.
test-browser: install
	$(RUN)/pytest -m browser tests/browser

# The Go client (clients/go, standard library only, Go >= 1.19): its tests start their own service from .venv.
# -count=1: the results depend on the service, not only on the Go sources, so they are never taken from the cache.
# Go needs a cache directory; without HOME (root in a bare container) it goes under .tools.
ifeq ($(HOME)$(XDG_CACHE_HOME)$(GOCACHE),)
test-clients: export GOCACHE := $(CURDIR)/.tools/go-cache
endif
ifeq ($(HOME)$(GOPATH),)
test-clients: export GOPATH := $(CURDIR)/.tools/go
endif
test-clients: install
	cd clients/go && go test -count=1 ./...

# The relay workload side by side with pgbench on one server; BENCH_ARGS passes options (ledger-service bench -h).
bench: install
	$(RUN)/ledger-service bench $(BENCH_ARGS)

# The failover drill (docs/operations.md, "The failover drill"): etcd, Patroni and PostgreSQL 15 from Debian's
# archive (installed when missing, as root), on loopback; about four minutes.
ha-drill: install
	$(RUN)/ledger-service ha-drill $(DRILL_ARGS)

lint: install
	$(RUN)/ruff check .
	$(RUN)/ruff format --check .
	$(RUN)/mypy
	$(RUN)/lint-imports --no-cache

format: install
	$(RUN)/ruff check --fix .
	$(RUN)/ruff format .

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
