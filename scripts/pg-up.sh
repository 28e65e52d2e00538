#!/usr/bin/env bash
# Makes sure a local PostgreSQL answers on 127.0.0.1:5432 and that the current OS user can
# connect as a superuser over TCP (the tests and the demo create their own databases).
set -euo pipefail
log() { printf 'pg-up: %s\n' "$*" >&2; }

PGHOST_="${PGHOST:-127.0.0.1}"
PGPORT_="${PGPORT:-5432}"

ready() { pg_isready -q -h "$PGHOST_" -p "$PGPORT_" >/dev/null 2>&1; }

if ! ready; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    log "PostgreSQL is not installed: installing Debian's postgresql"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  if [ -z "$ver" ]; then log "no PostgreSQL cluster found under /etc/postgresql"; exit 1; fi
  if ! pg_lsclusters -h | awk '{print $2}' | grep -qx main; then
    pg_createcluster "$ver" main >/dev/null
  fi
  log "starting PostgreSQL $ver/main"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 1 60); do ready && break; sleep 0.5; done
  ready || { log "PostgreSQL did not come up on $PGHOST_:$PGPORT_"; exit 1; }
fi

# The tests and the demo connect over TCP on loopback without a password (a test machine's
# server, reachable only from this host). Debian's default asks loopback clients for one:
# trust them instead, once, ahead of the other rules.
if ! psql -w -h "$PGHOST_" -p "$PGPORT_" -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
  ver=$(ls /etc/postgresql | sort -V | tail -n1)
  hba="/etc/postgresql/$ver/main/pg_hba.conf"
  if [ -f "$hba" ] && ! grep -q '^# runner: loopback trust' "$hba"; then
    log "trusting loopback TCP connections in $hba (a test machine's server)"
    { printf '# runner: loopback trust (scripts/pg-up.sh)\n'
      printf 'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n'
      cat "$hba"; } > "$hba.new"
    chown --reference="$hba" "$hba.new" 2>/dev/null || true
    chmod --reference="$hba" "$hba.new" 2>/dev/null || true
    mv "$hba.new" "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    for _ in $(seq 1 20); do
      psql -w -h "$PGHOST_" -p "$PGPORT_" -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1 && break
      sleep 0.25
    done
  fi
fi

# A role for the current OS user, so that plain `psql -h 127.0.0.1` works for scripts.
me=$(id -un)
if ! psql -h "$PGHOST_" -p "$PGPORT_" -U postgres -d postgres -tAc "select 1 from pg_roles where rolname='$me'" 2>/dev/null | grep -q 1; then
  if [ "$(id -u)" = 0 ]; then
    su postgres -c "psql -q -c \"create role \\\"$me\\\" superuser login\"" || true
  fi
fi
log "PostgreSQL is up on $PGHOST_:$PGPORT_"
