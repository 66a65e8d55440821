#!/usr/bin/env bash
# A real multi-node Ray cluster on this one machine: a head node plus N worker nodes, each its
# own raylet with its own resources, ports and temp dir, so `ray job submit` and multi-node
# scheduling behave as on a cloud cluster (one GCS, several nodes, a Jobs API).
#
#   infra/local-cluster.sh start [--workers N] [--head-cpus C] [--worker-cpus C]
#                                [--worker-gpus G] [--port P] [--dashboard-port P]
#                                [--object-store-mb M]
#   infra/local-cluster.sh status
#   infra/local-cluster.sh stop
#
# Then:  export RAY_AUTH_MODE=token
#        ray job submit --address http://127.0.0.1:8265 --working-dir . -- raypeft run configs/quickstart.yaml
#
# Why not plain `ray stop`: it kills every Ray process of every user on the machine (other
# clusters, other test runs). Each node here is a `ray start --block` in its own session; stop
# sends SIGTERM to those pids (Ray then shuts its own children down) and only then SIGKILLs
# whatever is left in those sessions, by pid.
#
# Exposure: the dashboard / Jobs API binds to 127.0.0.1. Ray does not let a node's GCS and raylet
# bind to loopback (it rewrites 127.0.0.1 to the machine's routable IP and listens on all
# interfaces), so the cluster runs with Ray's token authentication on: RAY_AUTH_MODE=token and the
# token in ~/.ray/auth_token (made with `ray get-auth-token --generate` if missing). Clients on this
# machine need `export RAY_AUTH_MODE=token` too. Opt out with RAY_AUTH_MODE=disabled at start.
#
# Environment: RAYPEFT_CLUSTER_DIR (state, logs and Ray temp dirs; default /tmp/raypeft-cluster-$UID,
# kept short because Ray's unix socket paths must stay under ~100 characters), RAY (the `ray`
# executable), RAYPEFT_CLUSTER_TIMEOUT (seconds to wait for start/stop, default 60).
# MLFLOW_TRACKING_URI, if exported when the cluster starts, is inherited by every job it runs.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
state="${RAYPEFT_CLUSTER_DIR:-/tmp/raypeft-cluster-$(id -u)}"
timeout="${RAYPEFT_CLUSTER_TIMEOUT:-60}"
ip=127.0.0.1   # where the dashboard listens and where clients find the GCS

if [[ -n "${RAY:-}" ]]; then
  ray_bin="$RAY"
elif command -v ray >/dev/null 2>&1; then
  ray_bin="$(command -v ray)"
elif [[ -x "$repo/.venv/bin/ray" ]]; then
  ray_bin="$repo/.venv/bin/ray"
else
  echo "local-cluster: no 'ray' executable on PATH or in $repo/.venv; install raypeft first (make install)" >&2
  exit 2
fi
# The Python that runs `ray` picks free ports and reads the dashboard, so both agree on the venv.
py="$(dirname "$ray_bin")/python"
[[ -x "$py" ]] || py="$(command -v python3)"
# Nodes inherit PATH, and a job's entrypoint (`python job.py`, `raypeft run ...`) resolves through
# it: put the venv that holds `ray` first, so jobs run with raypeft's Python, not the system one.
export PATH="$(dirname "$ray_bin"):$PATH"

die() { echo "local-cluster: $*" >&2; exit 2; }

usage() {
  if [[ "${1:-2}" == 0 ]]; then
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  else
    sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  fi
  exit "${1:-2}"
}

# pid files: $state/<node>.pid where <node> is head, worker-1, worker-2, ...
node_names() {
  local f
  [[ -f "$state/head.pid" ]] && echo head
  for f in "$state"/worker-*.pid; do
    [[ -e "$f" ]] && basename "$f" .pid
  done
  return 0
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# Every process still in the session a node's `ray start` opened (raylet, GCS, dashboard,
# agents, workers). Job entrypoints run in sessions of their own and are reaped by Ray's watcher.
session_pids() { ps -eo pid=,sid= | awk -v s="$1" '$2 == s { print $1 }'; }

free_ports() {  # free_ports N -> N distinct ports free right now on all interfaces
  "$py" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# Start one `ray start --block` in a new session; its pid is the session id.
launch() {  # launch NAME ARGS...
  local name="$1"; shift
  mkdir -p "$state/$name"
  # Non-interactive bash puts background jobs in its own process group, so setsid does not
  # fork and $! is the pid of `ray start` itself.
  setsid "$ray_bin" start --block --disable-usage-stats \
    --temp-dir "$state/$name" "$@" >"$state/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
}

wait_started() {  # wait_started NAME: until `ray start` says the node is up, or it died
  local name="$1" pid deadline=$((SECONDS + timeout))
  pid="$(cat "$state/$name.pid")"
  until grep -q "Ray runtime started" "$state/$name.log" 2>/dev/null; do
    alive "$pid" || { tail -n 20 "$state/$name.log" >&2; die "$name: ray start exited (log: $state/$name.log)"; }
    (( SECONDS < deadline )) || die "$name: not up after ${timeout}s (log: $state/$name.log)"
    sleep 0.5
  done
}

wait_dashboard() {  # until the Jobs API answers and lists every node alive (one Python process)
  local url="http://$ip:$(cat "$state/dashboard-port")"
  "$py" - "$url" "$1" "$timeout" <<'EOF' || die "dashboard at $url did not list $1 alive nodes after ${timeout}s"
import sys, time
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_nodes
url, want, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        JobSubmissionClient(url).list_jobs()
        if len(list_nodes(address=url, filters=[("state", "=", "ALIVE")])) >= want:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(1)
sys.exit(1)
EOF
}

mlflow_hint() {
  local dport; dport="$(cat "$state/dashboard-port" 2>/dev/null || echo 8265)"
  local auth; auth="$(cat "$state/auth-mode" 2>/dev/null || echo token)"
  if [[ "$auth" == token ]]; then
    echo "Auth:     export RAY_AUTH_MODE=token   # ray job submit / ray status send ~/.ray/auth_token"
  fi
  cat <<EOF
Submit:   RAY_ADDRESS=http://$ip:$dport ray job submit --working-dir . -- raypeft run configs/quickstart.yaml
Tracking: a job runs in a temporary copy of --working-dir, so the default ./mlflow.db and
          ./mlartifacts would vanish with the cluster. Export MLFLOW_TRACKING_URI before 'start'
          (jobs inherit it) or pass it per job with --runtime-env-json '{"env_vars": {...}}', and
          give the experiment a lasting artifact root:
            infra/mlflow-server.sh &   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
            ... -- raypeft run configs/quickstart.yaml --set tracking.artifact_location=mlflow-artifacts:/raypeft
EOF
  if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
    echo "          now: MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
  fi
}

cmd_start() {
  local workers=1 head_cpus=1 worker_cpus=1 worker_gpus=0 port=6379 dport=8265 store_mb=1024
  while (( $# )); do
    [[ "$1" == -h || "$1" == --help || $# -ge 2 ]] || die "start: $1 needs a value"
    case "$1" in
      --workers) workers="$2"; shift 2 ;;
      --head-cpus) head_cpus="$2"; shift 2 ;;
      --worker-cpus) worker_cpus="$2"; shift 2 ;;
      --worker-gpus) worker_gpus="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --dashboard-port) dport="$2"; shift 2 ;;
      --object-store-mb) store_mb="$2"; shift 2 ;;
      -h|--help) usage 0 ;;
      *) die "start: unknown option '$1' (expected --workers, --head-cpus, --worker-cpus, --worker-gpus, --port, --dashboard-port, --object-store-mb)" ;;
    esac
  done
  local v
  for v in "workers=$workers" "head-cpus=$head_cpus" "worker-cpus=$worker_cpus" \
           "worker-gpus=$worker_gpus" "port=$port" "dashboard-port=$dport" "object-store-mb=$store_mb"; do
    [[ "${v#*=}" =~ ^[0-9]+$ ]] || die "start: --${v%%=*} must be a whole number, got '${v#*=}'"
  done
  (( store_mb >= 100 )) || die "start: --object-store-mb must be >= 100, got $store_mb"
  local name pid
  for name in $(node_names); do
    pid="$(cat "$state/$name.pid")"
    alive "$pid" && die "a cluster is already running from $state ($name pid $pid); run '$0 stop' first"
  done
  # Every node must agree on the auth mode: `ray start --head` turns token auth on by itself when
  # a token file exists, but `ray start --address` does not, and would then be refused by the GCS.
  export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
  if [[ "$RAY_AUTH_MODE" == token ]]; then
    "$ray_bin" get-auth-token --generate >/dev/null || die "could not read or create the Ray auth token (ray get-auth-token --generate)"
  fi
  rm -rf "$state"
  mkdir -p "$state"
  echo "$RAY_AUTH_MODE" >"$state/auth-mode"
  # A node that fails to come up must not leave the others running.
  trap 'echo "local-cluster: start failed; stopping the nodes already started" >&2; cmd_stop >&2 || true' EXIT
  echo "$port" >"$state/port"
  echo "$dport" >"$state/dashboard-port"

  local store=$((store_mb * 1024 * 1024)) p
  # Ports that default to fixed numbers (dashboard agent 52365, client server 10001) or that
  # would race between nodes on one host are all picked here, distinct for every node.
  read -r -a p <<<"$(free_ports 7)"
  launch head --head --port "$port" --num-cpus "$head_cpus" --num-gpus 0 \
    --object-store-memory "$store" \
    --include-dashboard true --dashboard-host "$ip" --dashboard-port "$dport" \
    --node-manager-port "${p[0]}" --object-manager-port "${p[1]}" \
    --metrics-export-port "${p[2]}" --dashboard-agent-listen-port "${p[3]}" \
    --dashboard-agent-grpc-port "${p[4]}" --runtime-env-agent-port "${p[5]}" \
    --ray-client-server-port "${p[6]}"
  wait_started head

  local i
  for ((i = 1; i <= workers; i++)); do
    read -r -a p <<<"$(free_ports 6)"
    launch "worker-$i" --address "$ip:$port" --num-cpus "$worker_cpus" --num-gpus "$worker_gpus" \
      --resources "{\"worker_node\": 1}" --object-store-memory "$store" \
      --node-manager-port "${p[0]}" --object-manager-port "${p[1]}" \
      --metrics-export-port "${p[2]}" --dashboard-agent-listen-port "${p[3]}" \
      --dashboard-agent-grpc-port "${p[4]}" --runtime-env-agent-port "${p[5]}"
  done
  for ((i = 1; i <= workers; i++)); do wait_started "worker-$i"; done
  wait_dashboard $((workers + 1))
  trap - EXIT

  echo "Ray cluster up: head + $workers worker node(s), GCS $ip:$port, dashboard http://$ip:$dport"
  echo "State and logs: $state"
  mlflow_hint
}

cmd_stop() {
  local names name pid sid deadline left
  names="$(node_names)"
  [[ -n "$names" ]] || { echo "no cluster recorded in $state"; return 0; }
  # Workers first, so the head does not spend its grace period marking them dead.
  local order; order="$(grep -v '^head$' <<<"$names" || true; grep '^head$' <<<"$names" || true)"
  local sids=()
  for name in $order; do
    pid="$(cat "$state/$name.pid")"
    sids+=("$pid")
    alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
  done
  deadline=$((SECONDS + timeout))
  while :; do
    left=0
    for sid in "${sids[@]}"; do
      [[ -n "$(session_pids "$sid")" ]] && left=1
    done
    (( left == 0 )) && break
    if (( SECONDS >= deadline )); then
      for sid in "${sids[@]}"; do
        for pid in $(session_pids "$sid"); do kill -KILL "$pid" 2>/dev/null || true; done
      done
      sleep 1
      break
    fi
    sleep 0.5
  done
  for sid in "${sids[@]}"; do
    [[ -z "$(session_pids "$sid")" ]] || die "processes of session $sid still alive: $(session_pids "$sid" | tr '\n' ' ')"
  done
  for name in $names; do rm -f "$state/$name.pid"; done
  echo "Ray cluster stopped ($(wc -w <<<"$names") node(s)); logs kept in $state"
}

cmd_status() {
  local names name pid up=0
  names="$(node_names)"
  [[ -n "$names" ]] || { echo "no cluster recorded in $state"; return 3; }
  for name in $names; do
    pid="$(cat "$state/$name.pid")"
    if alive "$pid"; then
      echo "$name: running (pid $pid, $(session_pids "$pid" | wc -l) processes)"
      up=$((up + 1))
    else
      echo "$name: not running (last pid $pid)"
    fi
  done
  (( up > 0 )) || return 3
  RAY_AUTH_MODE="$(cat "$state/auth-mode")" "$ray_bin" status --address "$ip:$(cat "$state/port")" || true
  echo "Dashboard / Jobs API: http://$ip:$(cat "$state/dashboard-port")"
  mlflow_hint
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; (( $# == 0 )) || die "stop takes no options, got '$*'"; cmd_stop ;;
  status) shift; (( $# == 0 )) || die "status takes no options, got '$*'"; cmd_status ;;
  -h|--help) usage 0 ;;
  *) usage 2 ;;
esac
