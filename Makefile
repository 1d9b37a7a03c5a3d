# ackloop: `make` lists the targets.
#
# With DATABASE_URL unset, every target that needs a database starts a private, throwaway
# PostgreSQL cluster in .pg/ (git-ignored, Unix socket only; scripts/pg installs the server with
# apt when it is missing) and points DATABASE_URL at it. With DATABASE_URL set, that server is
# used instead, and must let the user create databases (the tests make one per test).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

SQLX_CLI_VERSION := 0.9.0
# The query macros read .sqlx/, never a live database, so every build checks the committed cache.
export SQLX_OFFLINE := true
# The binary, its tests and the HTTP exporter are behind the `cli` feature (a library user's
# default build has none of their crates); every target here builds with it.
FEATURES := --features cli

ifeq ($(strip $(DATABASE_URL)),)
EMBEDDED_PG := yes
DATABASE_URL := $(shell scripts/pg url)
endif
export DATABASE_URL

# Where cargo puts the binary: CARGO_TARGET_DIR, build.target-dir in a cargo config, or target/.
# Asked of cargo itself, so every way of moving the target directory is honoured.
TARGET_DIR = $(shell cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
BIN = $(TARGET_DIR)/debug/ackloop

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: db
db: ## Start the private PostgreSQL cluster (unless DATABASE_URL was given)
ifeq ($(EMBEDDED_PG),yes)
	@scripts/pg start
else
	@echo "using DATABASE_URL from the environment"
endif

.PHONY: db-stop
db-stop: ## Stop the private cluster
	@scripts/pg stop

.PHONY: db-clean
db-clean: db-stop ## Stop the private cluster and delete its data
	@target=$$(readlink .pg || true); rm -rf .pg; [ -z "$$target" ] || rm -rf "$$target"

.PHONY: build
build: ## Build the library and the ackloop binary
	cargo build $(FEATURES)

.PHONY: sqlx-cli
sqlx-cli: ## Install the pinned sqlx-cli if it is missing (for migrate, prepare, lint)
	@# With `sqlx-toml`, so that it reads sqlx.toml and records ackloop's migrations in
	@# ackloop._sqlx_migrations, as the library does; one built without it would use public's.
	@if ! cargo sqlx --version 2>/dev/null | grep -q ' $(SQLX_CLI_VERSION)$$' || \
	    ! grep -q '"sqlx-cli $(SQLX_CLI_VERSION) [^"]*":{[^}]*"sqlx-toml"' "$${CARGO_HOME:-$$HOME/.cargo}/.crates2.json" 2>/dev/null; then \
	  echo "installing sqlx-cli $(SQLX_CLI_VERSION) with sqlx.toml support (a few minutes, once)"; \
	  cargo install sqlx-cli --version $(SQLX_CLI_VERSION) --locked --force --no-default-features --features postgres,rustls,sqlx-toml; \
	fi

.PHONY: migrate
migrate: db sqlx-cli ## Apply migrations/ with sqlx-cli (`sqlx migrate run`)
	cargo sqlx migrate run

.PHONY: demo
demo: db build ## Migrate, start a worker, sign a user up, print the confirmed player
	@$(BIN) migrate
	@$(BIN) worker 2>.demo-worker.log & worker=$$!; \
	  trap 'kill -TERM $$worker 2>/dev/null; wait $$worker 2>/dev/null || true' EXIT; \
	  $(BIN) signup --email "demo-$$(date +%s%N)@example.com" --display-name "Demo Player" --timeout 10s
	@rm -f .demo-worker.log

.PHONY: test
test: db ## Run the whole test suite against a real PostgreSQL
	@scripts/pg pgbouncer >/dev/null
	cargo test --all-targets $(FEATURES)
	cargo test --doc $(FEATURES)

.PHONY: interop
interop: db build ## Node and Python peers beside the Rust binary, through the ackloop.* functions only
	ACKLOOP_BIN=$(BIN) scripts/interop

.PHONY: dashboard
dashboard: db build ## Serve the live dashboard on http://127.0.0.1:9465/ (Ctrl-C stops it)
	@$(BIN) migrate >/dev/null
	$(BIN) dashboard

.PHONY: browser
browser: db build ## The dashboard in headless Chromium (Debian's, installed if missing): numbers, a retry, screenshots
	ACKLOOP_BIN=$(BIN) scripts/browser

.PHONY: bench
bench: db ## Benchmark matrix (c = 1, 16, 64, and drain) beside the pgbench ceiling, as ratios
	cargo build --release $(FEATURES)
	scripts/bench

.PHONY: bench-scale
bench-scale: db ## Scale-out on one server: P auth x Q worker processes at 64 callers, beside the ceiling
	cargo build --release $(FEATURES)
	scripts/bench --scale

.PHONY: failover
failover: ## Failover on real servers: a primary and a synchronous standby, the primary crashed, the standby promoted
	scripts/pg-pair clean
	scripts/pg-pair start
	@# The shell runs with -e: catch the status, so the servers are cleaned up on a failure too.
	status=0; ACKLOOP_FAILOVER=1 cargo test --release $(FEATURES) --test failover || status=$$?; \
	  scripts/pg-pair clean; exit $$status

.PHONY: soak
# The soak's cluster also listens on loopback TCP, so that the soak can put a proxy that goes
# silent between the server and some of its processes. Its port is below Linux's ephemeral
# range (32768+): while the server is down, a connection to a port in that range can connect to
# itself (TCP simultaneous open) and read back its own bytes.
SOAK_PG := PG_DIR=$(CURDIR)/.pg-soak PG_PORT=$(or $(SOAK_PG_PORT),15433) PG_LISTEN=127.0.0.1

soak: ## Fault-injection soak on a private cluster of its own (SOAK_SEED=… repeats a run)
	$(SOAK_PG) scripts/pg start
	@# The shell runs with -e: catch the status, so the cluster is stopped on a failure too.
	status=0; $(SOAK_PG) ACKLOOP_SOAK=1 ACKLOOP_SOAK_URL="$$($(SOAK_PG) scripts/pg url)" \
	  cargo test --release $(FEATURES) --test soak || status=$$?; \
	  $(SOAK_PG) scripts/pg stop; exit $$status

# The offline cache is made and checked against a freshly migrated, empty database beside
# DATABASE_URL's (its name + _prepare): sqlx infers some columns' nullability from query plans,
# and plans depend on the data, so a cache made on a database with rows can fail the check on a
# clean one.
PREPARE_URL = $(shell echo '$(DATABASE_URL)' | sed -E 's#/([^/?]+)(\?|$$)#/\1_prepare\2#')

.PHONY: lint
lint: migrate ## rustfmt, clippy -D warnings, cargo doc -D warnings, and the .sqlx offline cache check
	cargo fmt --check
	cargo clippy --all-targets $(FEATURES) -- -D warnings
	cargo clippy --lib --no-default-features -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet $(FEATURES)
	cargo sqlx database reset -y --database-url '$(PREPARE_URL)' >/dev/null
	SQLX_OFFLINE=false DATABASE_URL='$(PREPARE_URL)' cargo sqlx prepare --check -- --all-targets $(FEATURES)

.PHONY: prepare
prepare: migrate ## Refresh the .sqlx offline query cache after changing a query
	cargo sqlx database reset -y --database-url '$(PREPARE_URL)' >/dev/null
	SQLX_OFFLINE=false DATABASE_URL='$(PREPARE_URL)' cargo sqlx prepare -- --all-targets $(FEATURES)

.PHONY: schema
schema: db ## Regenerate docs/schema.sql from the migrations
	@# The test that compares docs/schema.sql with a freshly migrated database writes it instead.
	ACKLOOP_BLESS_SCHEMA=1 cargo test $(FEATURES) --test it -- schema_dump
