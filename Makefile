# The two commands of the README are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
# One build cache outside the clone, shared by CI runs on this machine.
export CARGO_TARGET_DIR ?= /var/cache/wasm-runner/target
WASM_TARGET := wasm32-unknown-unknown
WASM_OUT := build/wasm
CAMPAIGN_WASM := $(WASM_OUT)/campaign-rules.wasm
export CAMPAIGN_RULES_WASM := $(abspath $(CAMPAIGN_WASM))

.PHONY: all setup transforms demo test unit-test e2e-test lint fmt clean

all: transforms
	cargo build -p runner

## Install what is missing (Debian packages, rust targets, PostgreSQL up).
setup:
	@bash scripts/setup.sh

## Build the rules component(s): a wasm32 core module per guest, wrapped into a component.
transforms: setup
	cargo build -p campaign-rules --target $(WASM_TARGET) --profile wasm
	@mkdir -p $(WASM_OUT)
	cargo run -q -p componentize -- $(CARGO_TARGET_DIR)/$(WASM_TARGET)/wasm/campaign_rules.wasm $(CAMPAIGN_WASM)

## The demo on embedded defaults (mock Kafka cluster in-process, local PostgreSQL).
demo: transforms
	cargo run -q -p runner -- --log warn demo --rules $(CAMPAIGN_WASM)

## The whole test suite: unit tests, the component's tests under wasmtime, end-to-end tests.
test: transforms
	cargo test --workspace --no-fail-fast

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	rm -rf build
