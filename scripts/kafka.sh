#!/usr/bin/env bash
# Installs and runs real Apache Kafka brokers (KRaft, no ZooKeeper) for end-to-end tests and
# benchmarks, on 127.0.0.1 only.
#
# The broker is org.apache.kafka:kafka_2.13 from Maven Central (version pinned in
# scripts/kafka/pom.xml; Java 17 bytecode), resolved with its runtime dependencies by
# `mvn dependency:copy-dependencies` into $KAFKA_HOME/<version>/libs through a private Maven
# repository ($KAFKA_HOME/m2, not ~/.m2), and run as `java -cp "libs/*:scripts/kafka" kafka.Kafka
# server.properties`. install also trains an AppCDS class-data archive once (~7 s), which makes
# each broker JVM start ~40% faster. Logging: scripts/kafka/log4j2.yaml, one server.log per node.
#
# A cluster NAME is 1 node (`start`) or 3 nodes (`start-cluster`); every node is a combined
# broker+controller (process.roles=broker,controller), node ids 1..N. Its state lives on disk in
# $KAFKA_HOME/run/NAME (cluster.env: ports, cluster id; node-I/{data,server.properties,pid,
# logs/server.log}) and survives stop/start and kill/restart-node: formatted data is never
# formatted again, so a full stop then start keeps every record.
#   1 node : replication factor 1 everywhere (offsets, transaction state, min ISR 1); dynamic KRaft
#            quorum of one voter (`StorageTool format --standalone`).
#   3 nodes: default.replication.factor=3, min.insync.replicas=2, offsets and transaction state
#            topics RF 3 / min ISR 2; static quorum (controller.quorum.voters) of the 3 nodes, so one
#            node may be killed and acks=all writes go on; broker.heartbeat.interval.ms=500.
#   both   : group.initial.rebalance.delay.ms=0; auto.create.topics.enable=false: create topics with
#            the admin API or `kafka.sh topic` (`kcat -P` to a missing topic fails after 30 s with
#            "Unknown topic or partition"); KAFKA_AUTO_CREATE_TOPICS=true turns auto-creation on.
#
#   scripts/kafka.sh install                  resolve the jars, train the CDS archive (idempotent;
#                                             ~15 s cold, ~0.1 s once cached); prints the lib dir
#   scripts/kafka.sh start NAME [PORT]        start (or restart) a 1-node cluster, wait until ready;
#                                             prints its bootstrap list
#   scripts/kafka.sh start-cluster NAME [BASEPORT]  the same for a 3-node cluster
#   scripts/kafka.sh stop NAME                SIGTERM every node at once (controlled shutdown), SIGKILL
#                                             after KAFKA_STOP_TIMEOUT; ~0.7 s for 1 node, ~5.5-6 s for
#                                             3 (the last KRaft leader waits 5 s for voters that are
#                                             gone); a last node left without quorum is SIGKILLed
#   scripts/kafka.sh kill NAME NODE           SIGKILL node NODE (1..N), wait until it is gone
#   scripts/kafka.sh restart-node NAME NODE   start node NODE again on its data, wait until ready (a
#                                             node killed less than broker.session.timeout.ms ago,
#                                             9 s by default, waits out its old registration first)
#   scripts/kafka.sh brokers NAME             print the bootstrap list 127.0.0.1:P1[,127.0.0.1:P2,...]
#   scripts/kafka.sh pid NAME NODE            print a running node's pid (exit 1 if it is not running)
#   scripts/kafka.sh status NAME              a line a node: "node I broker H:P controller H:P PID|down"
#   scripts/kafka.sh topic NAME TOPIC [PARTITIONS [RF]]  create a topic unless it exists
#                                             (TopicCommand; default 1 partition, RF 1 or 3)
#   scripts/kafka.sh wipe NAME                stop NAME and delete its data
#
# Ports. PORT is the broker (client) port; without it, or 0, a free one is picked. BASEPORT gives
# brokers BASEPORT..BASEPORT+2 and controllers BASEPORT+3..BASEPORT+5; without it (or 0) all six are
# picked free. A single node's controller port is always picked free. Ports are chosen when NAME is
# created and kept in cluster.env: later starts reuse them (another PORT is an error). A test that
# wants a fresh cluster runs `wipe NAME` first, and `wipe NAME` again when done.
# Ready means: the node logged "Kafka Server started" (KafkaRaftServer: broker unfenced, listeners
# up), its port is open and, where kcat is installed, its own metadata answer (kcat -L) lists it as a
# live, i.e. registered and unfenced, broker; `start-cluster` waits until each node lists all 3.
# Output: only the bootstrap list (start, start-cluster, brokers), a path (install), a pid or the
# status lines go to stdout; progress and errors go to stderr.
#
# Environment: KAFKA_HOME (default /var/cache/wasm-runner/kafka), KAFKA_START_TIMEOUT (s, default 90),
# KAFKA_STOP_TIMEOUT (s, default 30), KAFKA_HEAP_OPTS (default "-Xms512m -Xmx512m"), KAFKA_JVM_OPTS
# (extra JVM flags), KAFKA_LOG_LEVEL (root log level, default WARN), KAFKA_CDS=0 (no class-data
# archive), JAVA_HOME (else `java` on PATH; Java 17 or newer). Stored with NAME when set, so later
# starts and restart-node keep them: KAFKA_AUTO_CREATE_TOPICS (true|false, default false) and
# KAFKA_SERVER_PROPS (server.properties lines, appended last so they win; '' clears them), e.g.
# $'broker.session.timeout.ms=3000\nbroker.heartbeat.interval.ms=500' for a ~3-5 s leader failover
# instead of ~11-12 s.
set -euo pipefail

HOST="127.0.0.1"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF_DIR="$SCRIPT_DIR/kafka"
POM="$CONF_DIR/pom.xml"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\([^<]*\)</kafka.version>.*:\1:p' "$POM" | head -n 1)"
[ -n "$KAFKA_VERSION" ] || { echo "kafka.sh: no <kafka.version> in $POM" >&2; exit 1; }

KAFKA_HOME="${KAFKA_HOME:-/var/cache/wasm-runner/kafka}"
LIBS="$KAFKA_HOME/$KAFKA_VERSION/libs"
RUN="$KAFKA_HOME/run"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms512m -Xmx512m}"
# Kafka's own defaults (bin/kafka-run-class.sh), minus JMX; no hsperfdata files in /tmp.
JVM_OPTS="-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
  -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -XX:-UsePerfData -XX:+ExitOnOutOfMemoryError
  -Djava.awt.headless=true ${KAFKA_JVM_OPTS:-}"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
CLUSTER_SIZE=3

now_ms() { local t="${EPOCHREALTIME/[.,]/}"; echo $((t / 1000)); }

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------
# install

java_major() {
  local v
  v="$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([0-9][0-9.]*\).*/\1/p' | head -n 1)"
  v="${v#1.}"
  echo "${v%%.*}"
}

check_java() {
  command -v "$JAVA" >/dev/null 2>&1 || die "no java ($JAVA): run scripts/setup.sh (openjdk-17-jre-headless)"
  local m
  m="$(java_major)"
  if ! [[ "$m" =~ ^[0-9]+$ ]] || [ "$m" -lt 17 ]; then
    die "Kafka $KAFKA_VERSION needs Java 17+, $JAVA is '${m:-?}'"
  fi
}

# The lib dir is complete when its stamp names this pom's content.
pom_sum() { sha256sum "$POM" | cut -c1-64; }
libs_ok() { [ -f "$LIBS/.complete" ] && [ "$(cat "$LIBS/.complete" 2>/dev/null)" = "$(pom_sum)" ]; }

# AppCDS: a class-data archive of a trained broker JVM, made once by install for this pom and this
# exact java (`java -version` is part of the name); it cuts a broker's start from ~2.1 s to ~1.3 s
# and its CPU by 40%. A JVM that cannot use it (other java, other class path) runs without it.
# KAFKA_CDS=0 turns it off.
CDS_FILE=""
cds_file() {
  [ -n "$CDS_FILE" ] && return 0
  CDS_FILE="$KAFKA_HOME/$KAFKA_VERSION/cds/kafka-$({ pom_sum; "$JAVA" -version 2>&1; } | sha256sum | cut -c1-16).jsa"
}
cds_done() {
  [ "${KAFKA_CDS:-1}" = 0 ] && return 0
  cds_file
  [ -f "$CDS_FILE" ] || [ -f "$CDS_FILE.failed" ]
}
# JVM options that use the archive, if there is one.
cds_opts() {
  [ "${KAFKA_CDS:-1}" = 0 ] && return 0
  cds_file
  if [ -f "$CDS_FILE" ]; then echo "-XX:SharedArchiveFile=$CDS_FILE -Xshare:auto"; fi
}

# Train: a throwaway single-node broker started with -XX:ArchiveClassesAtExit, used a little (kcat),
# stopped with SIGTERM; the JVM writes the archive as it exits. Failure only costs the speed-up.
build_cds() {
  cds_file
  local t="$KAFKA_HOME/$KAFKA_VERSION/cds/train.$$" bp cp pid deadline ok=0
  rm -rf "$t"
  mkdir -p "$t/data" "$t/logs"
  read -r bp cp <<<"$(free_ports 2)"
  cat >"$t/server.properties" <<EOF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://$HOST:$bp,CONTROLLER://$HOST:$cp
advertised.listeners=PLAINTEXT://$HOST:$bp
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=$HOST:$cp
log.dirs=$t/data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
auto.create.topics.enable=true
EOF
  log "training the class-data (AppCDS) archive on a throwaway broker"
  if "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$CONF_DIR/log4j2-tools.yaml" -cp "$LIBS/*" \
    kafka.tools.StorageTool format --config "$t/server.properties" --cluster-id "$(new_cluster_id)" \
    --standalone >"$t/logs/format.log" 2>&1; then
    # shellcheck disable=SC2086
    "$JAVA" $HEAP_OPTS $JVM_OPTS -XX:ArchiveClassesAtExit="$t/kafka.jsa" -Dkafka.logs.dir="$t/logs" \
      -Dlog4j2.configurationFile="$CONF_DIR/log4j2.yaml" -cp "$LIBS/*" kafka.Kafka "$t/server.properties" \
      </dev/null >"$t/logs/stdout.log" 2>&1 &
    pid=$!
    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    until grep -q "Kafka Server started" "$t/logs/server.log" 2>/dev/null; do
      if ! alive "$pid" || [ "$(now_ms)" -ge "$deadline" ]; then break; fi
      sleep 0.1
    done
    if grep -q "Kafka Server started" "$t/logs/server.log" 2>/dev/null; then
      ok=1
      if command -v kcat >/dev/null 2>&1; then
        kcat -b "$HOST:$bp" -L -m 5 >/dev/null 2>&1 || true
        printf 'k:v\n' | timeout 20 kcat -b "$HOST:$bp" -K: -P -t cds-train >/dev/null 2>&1 || true
        timeout 20 kcat -b "$HOST:$bp" -C -t cds-train -e -o beginning >/dev/null 2>&1 || true
      fi
    fi
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$(($(now_ms) + 60000))
    while alive "$pid" && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.1; done
    if alive "$pid"; then
      kill -KILL "$pid" 2>/dev/null || true
      ok=0
    fi
    wait "$pid" 2>/dev/null || true
  fi
  if [ "$ok" = 1 ] && [ -s "$t/kafka.jsa" ]; then
    mv -f "$t/kafka.jsa" "$CDS_FILE"
    log "class-data archive: $CDS_FILE ($(du -h "$CDS_FILE" | cut -f1))"
  else
    log "WARNING: no class-data archive (brokers start without it); training logs were in $t/logs:"
    tail -n 5 "$t/logs/stdout.log" "$t/logs/server.log" >&2 2>/dev/null || true
    : >"$CDS_FILE.failed"
  fi
  rm -rf "$t"
}

cmd_install() {
  if libs_ok && cds_done; then
    echo "$LIBS"
    return 0
  fi
  check_java
  mkdir -p "$KAFKA_HOME/$KAFKA_VERSION/cds"
  # A subshell holds the lock, so no broker started later inherits its file descriptor.
  (
    flock 9
    if libs_ok; then
      cds_done || build_cds
      exit 0
    fi
    command -v mvn >/dev/null 2>&1 || die "no mvn: run scripts/setup.sh (maven)"
    local tmp="$KAFKA_HOME/$KAFKA_VERSION/libs.tmp.$$" mlog="$KAFKA_HOME/$KAFKA_VERSION/mvn.log"
    rm -rf "$tmp"
    log "resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies with mvn"
    if ! mvn -B -q -f "$POM" -Dstyle.color=never -Dmaven.repo.local="$KAFKA_HOME/m2" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >"$mlog" 2>&1; then
      rm -rf "$tmp"
      log "mvn failed; log tail ($mlog):"
      tail -n 30 "$mlog" >&2 || true
      exit 1
    fi
    [ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ] || die "mvn did not produce kafka_2.13-$KAFKA_VERSION.jar in $tmp"
    pom_sum >"$tmp/.complete"
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
    log "installed Kafka $KAFKA_VERSION: $(find "$LIBS" -name '*.jar' | wc -l) jars, $(du -sh "$LIBS" | cut -f1) in $LIBS"
    cds_done || build_cds
  ) 9>"$KAFKA_HOME/install.lock"
  libs_ok || die "install did not complete"
  echo "$LIBS"
}

# ---------------------------------------------------------------------------------------------
# cluster state: $RUN/NAME/cluster.env holds NODES, CLUSTER_ID, BROKER_PORTS, CONTROLLER_PORTS,
# AUTO_CREATE; $RUN/NAME/server-extra.properties holds the last KAFKA_SERVER_PROPS given.

check_name() {
  [[ "${1:-}" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] || die "NAME must match [A-Za-z0-9_][A-Za-z0-9._-]*, got '${1:-}'"
}

check_port() {
  if ! [[ "${1:-}" =~ ^[0-9]+$ ]] || [ "$1" -gt 65535 ] || { [ "$1" -ne 0 ] && [ "$1" -lt 1024 ]; }; then
    die "$2 must be 1024..65535 (or 0: pick a free one), got '${1:-}'"
  fi
}

state_file() { echo "$RUN/$1/cluster.env"; }
node_dir() { echo "$RUN/$1/node-$2"; }

NODES=0 CLUSTER_ID="" BPORTS=() CPORTS=() AUTO_CREATE=false
load_state() {
  local f
  f="$(state_file "$1")"
  [ -f "$f" ] || die "no cluster '$1' ($f missing): start it first"
  local NODES_ CLUSTER_ID_ BROKER_PORTS_ CONTROLLER_PORTS_ AUTO_CREATE_=false
  # shellcheck disable=SC1090
  . "$f"
  NODES="$NODES_" CLUSTER_ID="$CLUSTER_ID_" AUTO_CREATE="$AUTO_CREATE_"
  read -r -a BPORTS <<<"$BROKER_PORTS_"
  read -r -a CPORTS <<<"$CONTROLLER_PORTS_"
  if [ "${#BPORTS[@]}" != "$NODES" ] || [ "${#CPORTS[@]}" != "$NODES" ]; then die "corrupt $f"; fi
}

save_state() {
  local f tmp
  f="$(state_file "$1")"
  tmp="$f.tmp.$$"
  mkdir -p "$(dirname "$f")"
  printf 'NODES_=%s\nCLUSTER_ID_=%s\nBROKER_PORTS_="%s"\nCONTROLLER_PORTS_="%s"\nAUTO_CREATE_=%s\n' \
    "$NODES" "$CLUSTER_ID" "${BPORTS[*]}" "${CPORTS[*]}" "$AUTO_CREATE" >"$tmp"
  mv -f "$tmp" "$f"
}

# KAFKA_AUTO_CREATE_TOPICS and KAFKA_SERVER_PROPS, when set, are stored with NAME, so that a later
# start or restart-node without them keeps them (a set value replaces the stored one; '' clears).
apply_overrides() {
  local name="$1"
  if [ -n "${KAFKA_AUTO_CREATE_TOPICS:-}" ]; then
    [[ "$KAFKA_AUTO_CREATE_TOPICS" =~ ^(true|false)$ ]] || die "KAFKA_AUTO_CREATE_TOPICS must be true or false"
    AUTO_CREATE="$KAFKA_AUTO_CREATE_TOPICS"
    save_state "$name"
  fi
  if [ -n "${KAFKA_SERVER_PROPS+set}" ]; then
    printf '%s\n' "$KAFKA_SERVER_PROPS" >"$RUN/$name/server-extra.properties"
  fi
}

# N distinct free loopback ports, held open together while picked.
free_ports() {
  python3 - "$1" "$HOST" <<'PY'
import socket, sys
n, host = int(sys.argv[1]), sys.argv[2]
socks = []
for _ in range(n):
    s = socket.socket()
    s.bind((host, 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# A Kafka cluster id: a UUID in URL-safe base64 without padding (what StorageTool random-uuid prints),
# never starting with '-' (Kafka's own Uuid.randomUuid avoids that too: the tools would read it as an
# option).
new_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
    [ "${id:0:1}" != "-" ] && break
  done
  echo "$id"
}

bootstrap() {
  local i out=""
  for ((i = 0; i < NODES; i++)); do out+="${out:+,}$HOST:${BPORTS[$i]}"; done
  echo "$out"
}

# ---------------------------------------------------------------------------------------------
# processes

# alive and not a zombie (a reparented zombie may linger where PID 1 does not reap).
alive() { kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" != Z ]; }

# signal the node's process group (setsid made it the leader), falling back to the pid alone.
sig() { kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# pid from node I's pid file, if it names a live broker of this node; empty otherwise.
live_pid() {
  local d pid
  d="$(node_dir "$1" "$2")"
  [ -f "$d/pid" ] || return 0
  pid="$(cat "$d/pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  if alive "$pid" && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$d/server.properties"; then
    echo "$pid"
  fi
}

write_props() {
  local name="$1" i="$2" d rf minisr quorum j hb=""
  d="$(node_dir "$name" "$i")"
  if [ "$NODES" = 1 ]; then
    rf=1 minisr=1
    quorum="controller.quorum.bootstrap.servers=$HOST:${CPORTS[0]}"
  else
    rf=3 minisr=2
    # Heartbeats every 0.5 s, not 2 s: a broker stopping with the others gets its controlled-shutdown
    # go-ahead sooner, while a quorum is still up to give it (see cmd_stop).
    hb="broker.heartbeat.interval.ms=500"
    quorum="controller.quorum.voters="
    for ((j = 1; j <= NODES; j++)); do quorum+="$([ "$j" = 1 ] || echo ,)$j@$HOST:${CPORTS[$((j - 1))]}"; done
  fi
  mkdir -p "$d/data" "$d/logs"
  cat >"$d/server.properties.tmp" <<EOF
# Generated by scripts/kafka.sh at every start of this node; edits are lost.
process.roles=broker,controller
node.id=$i
listeners=PLAINTEXT://$HOST:${BPORTS[$((i - 1))]},CONTROLLER://$HOST:${CPORTS[$((i - 1))]}
advertised.listeners=PLAINTEXT://$HOST:${BPORTS[$((i - 1))]}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
$quorum
log.dirs=$d/data
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$minisr
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$minisr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$minisr
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=$AUTO_CREATE
$hb
# KAFKA_SERVER_PROPS (stored in $RUN/$name/server-extra.properties):
$(cat "$RUN/$name/server-extra.properties" 2>/dev/null || true)
EOF
  mv -f "$d/server.properties.tmp" "$d/server.properties"
}

# Format node I's data dir unless it already is (meta.properties exists): a restart keeps the data.
format_node() {
  local name="$1" i="$2" d
  d="$(node_dir "$name" "$i")"
  [ -f "$d/data/meta.properties" ] && return 0
  local extra=()
  [ "$NODES" = 1 ] && extra=(--standalone)
  # shellcheck disable=SC2046
  if ! "$JAVA" -Xmx256m $(cds_opts) -Dlog4j2.configurationFile="$CONF_DIR/log4j2-tools.yaml" \
    -cp "$LIBS/*:$CONF_DIR" kafka.tools.StorageTool format --config "$d/server.properties" --cluster-id "$CLUSTER_ID" \
    --ignore-formatted "${extra[@]}" >"$d/logs/format.log" 2>&1; then
    log "formatting node $i of $name failed ($d/logs/format.log):"
    tail -n 20 "$d/logs/format.log" >&2 || true
    return 1
  fi
}

# Launch node I (props written, data formatted); does not wait. Sets the pid file.
launch_node() {
  local name="$1" i="$2" d pid
  d="$(node_dir "$name" "$i")"
  printf '\n=== %s start\n' "$(date '+%F %T')" >>"$d/logs/stdout.log"
  # A fresh server.log a launch (the readiness check greps it); the previous one is kept.
  if [ -f "$d/logs/server.log" ]; then mv -f "$d/logs/server.log" "$d/logs/server.log.prev"; fi
  # shellcheck disable=SC2086,SC2046
  setsid nohup "$JAVA" $HEAP_OPTS $JVM_OPTS $(cds_opts) \
    -Dkafka.logs.dir="$d/logs" -Dkafka.log.level="${KAFKA_LOG_LEVEL:-WARN}" \
    -Dlog4j2.configurationFile="$CONF_DIR/log4j2.yaml" \
    -cp "$LIBS/*:$CONF_DIR" kafka.Kafka "$d/server.properties" \
    </dev/null >>"$d/logs/stdout.log" 2>&1 &
  pid=$!
  disown "$pid" 2>/dev/null || true
  echo "$pid" >"$d/pid"
}

# Broker ids in the metadata answer of the node on PORT (empty if it does not answer).
metadata_brokers() {
  kcat -b "$HOST:$1" -L -m 2 2>/dev/null | sed -n 's/^ *broker \([0-9][0-9]*\) at .*/\1/p' | sort -n | tr '\n' ' '
}

# Is node I ready? It logged "Kafka Server started" (KafkaRaftServer, once the broker is unfenced
# and its listeners accept requests), its port is open, and, where kcat is installed, its metadata
# answer lists it (ALL=1: lists every node) as a live, i.e. registered and unfenced, broker.
# (The log line comes first: a kcat probe sent earlier can sit out its whole -m timeout.)
node_ready() {
  local name="$1" i="$2" all="$3" port ids j
  port="${BPORTS[$((i - 1))]}"
  grep -q "Kafka Server started" "$(node_dir "$name" "$i")/logs/server.log" 2>/dev/null || return 1
  port_open "$port" || return 1
  command -v kcat >/dev/null 2>&1 || return 0
  ids=" $(metadata_brokers "$port")"
  if [ "$all" = 1 ]; then
    for ((j = 1; j <= NODES; j++)); do [[ "$ids" == *" $j "* ]] || return 1; done
  else
    [[ "$ids" == *" $i "* ]] || return 1
  fi
}

log_tail() {
  local d
  d="$(node_dir "$1" "$2")"
  log "node $2 of $1: tail of $d/logs/stdout.log and server.log:"
  tail -n 10 "$d/logs/stdout.log" >&2 2>/dev/null || true
  tail -n 30 "$d/logs/server.log" >&2 2>/dev/null || true
}

# Wait until the given nodes are ready; on a death or the deadline, show their logs, SIGKILL the
# nodes this call launched (LAUNCHED) and fail.
wait_ready() {
  local name="$1" all="$2" t0="$3"
  shift 3
  local pending=("$@") deadline=$((t0 + START_TIMEOUT * 1000)) i pid still
  while [ "${#pending[@]}" -gt 0 ]; do
    still=()
    for i in "${pending[@]}"; do
      pid="$(cat "$(node_dir "$name" "$i")/pid" 2>/dev/null || true)"
      if [ -z "$pid" ] || ! alive "$pid"; then
        log "node $i of $name exited during startup"
        log_tail "$name" "$i"
        abort_start "$name"
      fi
      node_ready "$name" "$i" "$all" || still+=("$i")
    done
    pending=(${still[@]+"${still[@]}"})
    [ "${#pending[@]}" -eq 0 ] && break
    if [ "$(now_ms)" -ge "$deadline" ]; then
      log "node(s) ${pending[*]} of $name not ready within ${START_TIMEOUT}s"
      for i in "${pending[@]}"; do log_tail "$name" "$i"; done
      abort_start "$name"
    fi
    sleep 0.1
  done
}

LAUNCHED=()
abort_start() {
  local name="$1" i pid
  for i in ${LAUNCHED[@]+"${LAUNCHED[@]}"}; do
    pid="$(live_pid "$name" "$i")"
    [ -n "$pid" ] && sig KILL "$pid"
    rm -f "$(node_dir "$name" "$i")/pid"
  done
  exit 1
}

# Start the given nodes of NAME (already in state) that are not running, and wait for them.
start_nodes() {
  local name="$1" all="$2" t0 i pid started=() p
  shift 2
  t0="$(now_ms)"
  cmd_install >/dev/null
  check_java
  for i in "$@"; do
    pid="$(live_pid "$name" "$i")"
    if [ -n "$pid" ]; then
      log "node $i of $name already running (pid $pid)"
      continue
    fi
    for p in "${BPORTS[$((i - 1))]}" "${CPORTS[$((i - 1))]}"; do
      port_open "$p" && die "node $i of $name: $HOST:$p is already in use by another process"
    done
    write_props "$name" "$i"
    started+=("$i")
  done
  # Format in parallel (one JVM each, ~2 s), then launch all together: a 3-voter quorum needs 2.
  local fpids=() ok=1
  for i in ${started[@]+"${started[@]}"}; do
    format_node "$name" "$i" &
    fpids+=($!)
  done
  for p in ${fpids[@]+"${fpids[@]}"}; do wait "$p" || ok=0; done
  [ "$ok" = 1 ] || die "formatting failed"
  for i in ${started[@]+"${started[@]}"}; do
    launch_node "$name" "$i"
    LAUNCHED+=("$i")
  done
  # Wait for all requested nodes (running ones too: they must see the restarted ones).
  wait_ready "$name" "$all" "$t0" "$@"
  local pids=""
  for i in "$@"; do pids+="${pids:+ }$i:$(live_pid "$name" "$i")"; done
  log "$name ready in $(($(now_ms) - t0)) ms (node:pid $pids; logs in $RUN/$name/node-*/logs)"
}

# Create NAME's state with N nodes (or check an existing one against the given ports).
ensure_state() {
  local name="$1" n="$2" base="$3" i
  if [ -f "$(state_file "$name")" ]; then
    load_state "$name"
    [ "$NODES" = "$n" ] || die "$name is a $NODES-node cluster (use $([ "$NODES" = 1 ] && echo start || echo start-cluster), or wipe it)"
    if [ "$base" != 0 ] && [ "$base" != "${BPORTS[0]}" ]; then
      die "$name was created with broker port ${BPORTS[0]}, not $base: omit the port, or wipe $name"
    fi
    apply_overrides "$name"
    return 0
  fi
  NODES="$n"
  CLUSTER_ID="$(new_cluster_id)"
  if [ "$base" = 0 ]; then
    read -r -a BPORTS <<<"$(free_ports "$((2 * n))")"
    CPORTS=("${BPORTS[@]:n}")
    BPORTS=("${BPORTS[@]:0:n}")
  elif [ "$n" = 1 ]; then
    BPORTS=("$base")
    read -r -a CPORTS <<<"$(free_ports 1)"
    [ "${CPORTS[0]}" != "$base" ] || read -r -a CPORTS <<<"$(free_ports 1)"
  else
    [ "$((base + 2 * n - 1))" -le 65535 ] || die "BASEPORT $base leaves no room for $((2 * n)) ports"
    BPORTS=() CPORTS=()
    for ((i = 0; i < n; i++)); do
      BPORTS+=($((base + i)))
      CPORTS+=($((base + n + i)))
    done
  fi
  AUTO_CREATE=false
  save_state "$name"
  apply_overrides "$name"
  log "created $name: $n node(s), cluster id $CLUSTER_ID, broker ports ${BPORTS[*]}, controller ports ${CPORTS[*]}"
}

# ---------------------------------------------------------------------------------------------
# commands

cmd_start() {
  local name="${1:-}" port="${2:-0}"
  check_name "$name"
  check_port "$port" PORT
  ensure_state "$name" 1 "$port"
  start_nodes "$name" 1 1
  bootstrap
}

cmd_start_cluster() {
  local name="${1:-}" base="${2:-0}"
  check_name "$name"
  check_port "$base" BASEPORT
  ensure_state "$name" "$CLUSTER_SIZE" "$base"
  start_nodes "$name" 1 $(seq 1 "$CLUSTER_SIZE")
  bootstrap
}

check_node() {
  if ! [[ "${1:-}" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ] || [ "$1" -gt "$NODES" ]; then
    die "NODE must be 1..$NODES, got '${1:-}'"
  fi
}

cmd_stop() {
  local name="${1:-}" i pid pids=() nodes=() t0
  check_name "$name"
  [ -f "$(state_file "$name")" ] || { log "no cluster '$name'"; return 0; }
  load_state "$name"
  t0="$(now_ms)"
  for ((i = 1; i <= NODES; i++)); do
    pid="$(live_pid "$name" "$i")"
    if [ -n "$pid" ]; then
      pids+=("$pid") nodes+=("$i")
      sig TERM "$pid"
    else
      rm -f "$(node_dir "$name" "$i")/pid"
    fi
  done
  if [ "${#pids[@]}" -eq 0 ]; then
    log "$name: not running"
    return 0
  fi
  local deadline=$((t0 + STOP_TIMEOUT * 1000)) k any lone lone_since=0
  while :; do
    any=0 lone=""
    for k in "${!pids[@]}"; do
      if alive "${pids[$k]}"; then
        any=$((any + 1))
        lone="$k"
      fi
    done
    [ "$any" = 0 ] && break
    # The lone survivor of a cluster whose broker has not had the controller's go-ahead for its
    # controlled shutdown never will (no quorum is left to commit it) and would wait 5 minutes:
    # SIGKILL it. (Seen ~1 stop in 8 with 3 nodes: the active controller's own broker is the last
    # to be released, after the other two have exited.) Its next start is unclean and waits out
    # its old registration (broker.session.timeout.ms).
    if [ "$NODES" -gt 1 ] && [ "$any" = 1 ] && [ "$lone_since" -ge 0 ]; then
      [ "$lone_since" != 0 ] || lone_since="$(now_ms)"
      if [ "$(($(now_ms) - lone_since))" -ge 2000 ] && ! broker_released "$name" "${nodes[$lone]}"; then
        log "node ${nodes[$lone]} of $name (pid ${pids[$lone]}) is the last one up and its broker still waits for a controlled-shutdown go-ahead that no quorum can give: SIGKILL"
        sig KILL "${pids[$lone]}"
        lone_since=-1
      fi
    fi
    if [ "$(now_ms)" -ge "$deadline" ]; then
      for k in "${!pids[@]}"; do
        if alive "${pids[$k]}"; then
          log "node ${nodes[$k]} of $name (pid ${pids[$k]}) ignored SIGTERM for ${STOP_TIMEOUT}s: SIGKILL"
          sig KILL "${pids[$k]}"
        fi
      done
      deadline=$(($(now_ms) + 5000))
      while [ "$(now_ms)" -lt "$deadline" ]; do
        any=0
        for pid in "${pids[@]}"; do alive "$pid" && any=1; done
        [ "$any" = 0 ] && break
        sleep 0.05
      done
      break
    fi
    sleep 0.05
  done
  for i in "${nodes[@]}"; do rm -f "$(node_dir "$name" "$i")/pid"; done
  log "stopped $name (nodes ${nodes[*]}) in $(($(now_ms) - t0)) ms"
}

# Has node I's broker finished, or been released into, its shutdown (see cmd_stop)?
broker_released() {
  grep -q -e "Transitioning from PENDING_CONTROLLED_SHUTDOWN to SHUTTING_DOWN" \
    -e "\[BrokerServer id=$2\] shut down completed" "$(node_dir "$1" "$2")/logs/server.log" 2>/dev/null
}

cmd_kill() {
  local name="${1:-}" node="${2:-}" pid deadline
  check_name "$name"
  load_state "$name"
  check_node "$node"
  pid="$(live_pid "$name" "$node")"
  if [ -z "$pid" ]; then
    log "node $node of $name is not running"
    return 0
  fi
  sig KILL "$pid"
  deadline=$(($(now_ms) + 10000))
  while alive "$pid" && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.02; done
  alive "$pid" && die "pid $pid survived SIGKILL for 10s"
  rm -f "$(node_dir "$name" "$node")/pid"
  log "killed node $node of $name (pid $pid)"
}

cmd_restart_node() {
  local name="${1:-}" node="${2:-}"
  check_name "$name"
  load_state "$name"
  check_node "$node"
  [ -f "$(node_dir "$name" "$node")/data/meta.properties" ] || die "node $node of $name has no formatted data: use start/start-cluster"
  apply_overrides "$name"
  start_nodes "$name" 0 "$node"
}

cmd_brokers() {
  check_name "${1:-}"
  load_state "$1"
  bootstrap
}

cmd_pid() {
  local pid
  check_name "${1:-}"
  load_state "$1"
  check_node "${2:-}"
  pid="$(live_pid "$1" "$2")"
  [ -n "$pid" ] || { log "node $2 of $1 is not running"; exit 1; }
  echo "$pid"
}

cmd_status() {
  local i pid
  check_name "${1:-}"
  load_state "$1"
  for ((i = 1; i <= NODES; i++)); do
    pid="$(live_pid "$1" "$i")"
    echo "node $i broker $HOST:${BPORTS[$((i - 1))]} controller $HOST:${CPORTS[$((i - 1))]} ${pid:-down}"
  done
}

cmd_topic() {
  local name="${1:-}" topic="${2:-}" parts="${3:-1}" rf="${4:-}"
  check_name "$name"
  load_state "$name"
  [ -n "$topic" ] || die "usage: topic NAME TOPIC [PARTITIONS [RF]]"
  [ -n "$rf" ] || rf="$([ "$NODES" = 1 ] && echo 1 || echo 3)"
  cmd_install >/dev/null
  # shellcheck disable=SC2046
  "$JAVA" -Xmx256m $(cds_opts) -Dlog4j2.configurationFile="$CONF_DIR/log4j2-tools.yaml" -cp "$LIBS/*:$CONF_DIR" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "$(bootstrap)" --create --if-not-exists \
    --topic "$topic" --partitions "$parts" --replication-factor "$rf" >&2
}

cmd_wipe() {
  local name="${1:-}"
  check_name "$name"
  [ -d "$RUN/$name" ] || return 0
  [ -f "$(state_file "$name")" ] && cmd_stop "$name"
  rm -rf "${RUN:?}/$name"
  log "wiped $name"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start "${2:-}" "${3:-0}" ;;
  start-cluster) cmd_start_cluster "${2:-}" "${3:-0}" ;;
  stop) cmd_stop "${2:-}" ;;
  kill) cmd_kill "${2:-}" "${3:-}" ;;
  restart-node) cmd_restart_node "${2:-}" "${3:-}" ;;
  brokers) cmd_brokers "${2:-}" ;;
  pid) cmd_pid "${2:-}" "${3:-}" ;;
  status) cmd_status "${2:-}" ;;
  topic) cmd_topic "${2:-}" "${3:-}" "${4:-1}" "${5:-}" ;;
  wipe) cmd_wipe "${2:-}" ;;
  *) usage ;;
esac
