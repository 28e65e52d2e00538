# The two commands of the README are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
# One build cache outside the clone, shared by CI runs on this machine.
export CARGO_TARGET_DIR ?= /var/cache/wasm-runner/target
WASM_TARGET := wasm32-unknown-unknown
WASM_OUT := build/wasm
CAMPAIGN_WASM := $(WASM_OUT)/campaign-rules.wasm
export CAMPAIGN_RULES_WASM := $(abspath $(CAMPAIGN_WASM))
SALES_WASM := $(WASM_OUT)/sales-rules.wasm
export SALES_RULES_WASM := $(abspath $(SALES_WASM))

.PHONY: all setup build transforms demo test fuzz crash-loop bench lint fmt clean

all: build

## Everything the tests and the demo run, built once with the same feature set (a plain
## `cargo build -p runner` unifies features differently and would rebuild wasmtime and rdkafka).
build: transforms
	cargo test --workspace --no-run

## Install what is missing (Debian packages, rust targets, PostgreSQL up).
setup:
	@bash scripts/setup.sh

WASM_BUILD := $(CARGO_TARGET_DIR)/$(WASM_TARGET)/wasm
FIXTURES := $(WASM_OUT)/fixtures
export RULES_FIXTURES := $(abspath $(FIXTURES))
# Builds one guest (crate, cargo flags) and wraps it into a component at the given path.
define guest
	cargo build -q -p $(1) $(2) --target $(WASM_TARGET) --profile wasm
	cargo run -q -p componentize -- $(WASM_BUILD)/$(subst -,_,$(1)).wasm $(3)
endef

## Build the rules components and the test fixtures: wasm32 core modules wrapped into components.
transforms: setup
	@mkdir -p $(WASM_OUT) $(FIXTURES)
	$(call guest,campaign-rules,,$(CAMPAIGN_WASM))
	$(call guest,campaign-rules,--features v2,$(FIXTURES)/campaign-rules-v2.wasm)
	$(call guest,campaign-rules,--no-default-features --features contract-3,$(FIXTURES)/campaign-rules-contract-3.wasm)
	$(call guest,sales-rules,,$(SALES_WASM))
	$(call guest,sales-rules,--features v2,$(FIXTURES)/sales-rules-v2.wasm)
	$(call guest,hostile-rules,,$(FIXTURES)/hostile.wasm)
	$(call guest,hostile-rules,--features broken,$(FIXTURES)/hostile-broken.wasm)
	$(call guest,hostile-rules,--features wrong-window,$(FIXTURES)/hostile-wrong-window.wasm)
	for w in transforms/fixtures/wat/*.wat; do \
	  cargo run -q -p componentize -- $$w $(FIXTURES)/$$(basename $$w .wat).wasm || exit 1; done
	head -c 4096 /dev/urandom > $(FIXTURES)/garbage.wasm

## The demo on embedded defaults (mock Kafka cluster in-process, local PostgreSQL).
demo: build
	$(CARGO_TARGET_DIR)/debug/runner --log warn demo --rules $(CAMPAIGN_WASM) --sales-rules $(SALES_WASM)

## The whole test suite: unit tests, the component's tests under wasmtime, end-to-end tests.
test: transforms
	@bash scripts/drop-test-dbs.sh
	cargo test --workspace --no-fail-fast

## A long fuzz run: the property tests of tests/tests/e2e/fuzz/ with FUZZ_RULES_CASES inputs per
## rules property (campaign validate, campaign shape, sales validate batches) and
## FUZZ_E2E_BATCHES batches of up to FUZZ_E2E_BATCH generated messages through each pipeline end
## to end (`make test` runs a short pass of the same). Prints each property's figures.
FUZZ_RULES_CASES ?= 1000000
FUZZ_E2E_BATCHES ?= 300
FUZZ_E2E_BATCH ?= 16
fuzz: transforms
	FUZZ_RULES_CASES=$(FUZZ_RULES_CASES) FUZZ_E2E_BATCHES=$(FUZZ_E2E_BATCHES) \
	  FUZZ_E2E_BATCH=$(FUZZ_E2E_BATCH) RUST_LOG=$${RUST_LOG:-error} \
	  cargo test -p e2e-tests --test e2e fuzz:: -- --nocapture --test-threads 1

## A long crash loop against Apache Kafka (kill -9 at random moments), e.g. CRASH_LOOPS=200.
CRASH_LOOPS ?= 200
crash-loop: build
	CRASH_LOOPS=$(CRASH_LOOPS) cargo test -p e2e-tests --test kafka -- --nocapture kill_dash_nine

## Benchmarks (release build; figures, never assertions). Results: bench-results/*.md, *.json.
## The fan-out's Python peer (benches/peers/) runs in a virtual environment outside the clone,
## made by scripts/bench-peers.sh when missing.
BENCH := $(CARGO_TARGET_DIR)/release/bench
BENCH_PEERS_VENV ?= /var/cache/wasm-runner/peers-venv
bench: export BENCH_PEERS_VENV := $(BENCH_PEERS_VENV)
bench: export BENCH_PEER_PYTHON ?= $(BENCH_PEERS_VENV)/bin/python
bench: transforms
	bash scripts/bench-peers.sh
	cargo build --release -p bench
	$(BENCH) rules --component $(CAMPAIGN_WASM)
	cargo bench -p bench --bench rules_call
	$(BENCH) fanout --rules $(CAMPAIGN_WASM)
	$(BENCH) latency --rules $(CAMPAIGN_WASM) --v2 $(FIXTURES)/campaign-rules-v2.wasm
	$(BENCH) schedule --rules $(CAMPAIGN_WASM)
	$(BENCH) cache
	$(BENCH) windows --rules $(SALES_WASM)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	rm -rf build
