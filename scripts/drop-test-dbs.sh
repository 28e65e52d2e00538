#!/usr/bin/env bash
# Drops the databases earlier test runs created (each test makes its own: t_ + 12 hex digits),
# so repeated runs on one machine do not accumulate them. Touches no other database.
set -euo pipefail
PSQL=(psql -h "${PGHOST:-127.0.0.1}" -p "${PGPORT:-5432}" -U "${PGUSER:-postgres}" -d postgres -v ON_ERROR_STOP=1 -qtA)
n=0
while read -r db; do
  [ -n "$db" ] || continue
  "${PSQL[@]}" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  n=$((n + 1))
done < <("${PSQL[@]}" -c "SELECT datname FROM pg_database WHERE datname ~ '^t_[0-9a-f]{12}$'")
echo "drop-test-dbs: dropped $n test database(s)" >&2
