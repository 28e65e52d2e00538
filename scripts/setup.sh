#!/usr/bin/env bash
# Installs everything the demo and the test suite need on a fresh machine of this kind:
# Debian packages (cmake and libcurl for rdkafka's bundled librdkafka, PostgreSQL, kcat, a Java 17
# runtime and Maven for the real Kafka broker of scripts/kafka.sh),
# the Rust WASM targets, and starts PostgreSQL when it is installed but down.
# Idempotent: each step checks before it acts.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_pkgs=()
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
dpkg -s libcurl4-openssl-dev >/dev/null 2>&1 || need_pkgs+=(libcurl4-openssl-dev)
command -v kcat >/dev/null 2>&1 || need_pkgs+=(kcat)
command -v pg_ctlcluster >/dev/null 2>&1 || need_pkgs+=(postgresql)
command -v psql >/dev/null 2>&1 || need_pkgs+=(postgresql-client)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
dpkg -s libssl-dev >/dev/null 2>&1 || need_pkgs+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
command -v java >/dev/null 2>&1 || need_pkgs+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_pkgs+=(maven)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

for t in wasm32-unknown-unknown; do
  if ! rustup target list --installed | grep -qx "$t"; then
    log "adding rust target $t"
    rustup target add "$t"
  fi
done

"$(dirname "$0")/pg-up.sh"

# A real Apache Kafka 4.x (KRaft) broker, assembled from Maven Central jars into a cache outside the repo.
"$(dirname "$0")/kafka.sh" install >/dev/null
