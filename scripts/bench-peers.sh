#!/usr/bin/env bash
# The Python environment of the benchmark peers (benches/peers/): a virtual environment outside
# the clone with benches/peers/requirements.txt installed. Idempotent: it installs only when the
# environment is missing or the requirements changed since it was made. `make bench` runs it;
# `make test` never does. Prints nothing when there is nothing to do.
#   BENCH_PEERS_VENV  where the environment lives (default /var/cache/wasm-runner/peers-venv)
#   PYTHON            the interpreter that makes it (default python3)
set -euo pipefail

log() { printf 'bench-peers: %s\n' "$*" >&2; }

here="$(cd "$(dirname "$0")/.." && pwd)"
req="$here/benches/peers/requirements.txt"
venv="${BENCH_PEERS_VENV:-/var/cache/wasm-runner/peers-venv}"
python="${PYTHON:-python3}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"

if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # Debian's python3 ships venv and ensurepip in a package of their own.
  log "installing python3-venv"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi

log "making $venv"
mkdir -p "$(dirname "$venv")"
rm -f "$stamp"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
echo "$want" > "$stamp"
log "installed $(cd "$here" && "$venv/bin/python" -m pip freeze --disable-pip-version-check | tr '\n' ' ')"
