#!/usr/bin/env bash
# Where the machine's CPU goes during `bench fanout`'s fan-out phase: samples every process
# (the runner inside the bench, the Kafka broker (java), the PostgreSQL backends) with `perf record -a`
# once the phase has started, then prints the share of each process, of its user code / C
# library / kernel, and its top symbols. Installs Debian's linux-perf when perf is missing.
#
#   scripts/profile-fanout.sh [extra bench fanout args]
#
# Environment: BENCH (the release bench binary; default $CARGO_TARGET_DIR/release/bench),
# RULES (default build/wasm/campaign-rules.wasm), PROFILE_SECS (default 8), PROFILE_OUT
# (default /tmp/profile-fanout). Run `make bench` (or at least its build) first.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'profile-fanout: %s\n' "$*" >&2; }

if ! command -v perf >/dev/null 2>&1; then
  log "installing linux-perf"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq linux-perf >/dev/null
fi

BENCH="${BENCH:-${CARGO_TARGET_DIR:-/var/cache/wasm-runner/target}/release/bench}"
RULES="${RULES:-build/wasm/campaign-rules.wasm}"
SECS="${PROFILE_SECS:-8}"
OUT="${PROFILE_OUT:-/tmp/profile-fanout}"
[ -x "$BENCH" ] || { log "no bench binary at $BENCH: run make bench first"; exit 1; }
mkdir -p "$OUT"

# 2,000 campaigns: the phase lasts long enough to sample well after its start.
"$BENCH" --out "$OUT/results" fanout --rules "$RULES" --runs 1 --campaigns 2000 "$@" \
  2>"$OUT/bench.err" &
bench_pid=$!
trap 'kill "$bench_pid" 2>/dev/null || true' EXIT
until grep -q "fan-out of .* starts" "$OUT/bench.err" 2>/dev/null; do
  kill -0 "$bench_pid" 2>/dev/null || { cat "$OUT/bench.err" >&2; exit 1; }
  sleep 0.2
done
sleep 2
log "sampling every CPU for ${SECS}s"
perf record -a -F 499 -o "$OUT/perf.data" -- sleep "$SECS" 2>/dev/null
# The sampled processes, named while they still run.
perf script -i "$OUT/perf.data" -F pid 2>/dev/null | sort | uniq -c | sort -rn | head -6 |
  while read -r n pid; do
    if [ "$pid" = 0 ]; then echo "0 idle"; continue; fi
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || echo "?")
    echo "$pid $(basename "$exe")"
  done >"$OUT/pids"
wait "$bench_pid"
trap - EXIT
grep "run 1/1" "$OUT/bench.err"

total=$(perf script -i "$OUT/perf.data" -F pid 2>/dev/null | wc -l)
echo
echo "CPU by process over ${SECS}s (share of all samples; 100% = every core busy):"
perf script -i "$OUT/perf.data" -F pid 2>/dev/null | sort | uniq -c | sort -rn | head -6 |
  while read -r n pid; do
    name=$(awk -v p="$pid" '$1 == p {print $2}' "$OUT/pids")
    awk -v n="$n" -v t="$total" -v name="${name:-other}" -v pid="$pid" \
      'BEGIN {printf "  %5.1f%%  %s (pid %s)\n", 100 * n / t, name, pid}'
  done
echo
echo "By process and object (user code, C library, kernel):"
perf script -i "$OUT/perf.data" -F pid,ip,dso 2>/dev/null |
  awk -v t="$total" 'NR == FNR {name[$1] = $2; next}
    {c[(($1 in name) ? name[$1] : "pid " $1) " " $NF]++}
    END {for (k in c) printf "  %5.1f%%  %s\n", 100 * c[k] / t, k}' "$OUT/pids" - |
  sort -rn | head -12
while read -r pid name; do
  echo
  echo "Top symbols of $name (pid $pid), share of all samples:"
  perf report -i "$OUT/perf.data" --pid "$pid" --sort sym --stdio 2>/dev/null |
    grep -v '^#' | grep -v '^$' | head -12
done < <(grep -v ' idle$' "$OUT/pids" | head -3)
