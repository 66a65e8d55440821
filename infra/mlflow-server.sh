#!/usr/bin/env bash
# Start an MLflow tracking server for a Ray cluster's runs and adapter registry.
#
#   infra/mlflow-server.sh [BACKEND_URI] [ARTIFACT_ROOT]
#
# Defaults: a SQLite store and a local artifact folder under ./mlflow-server/. For a team,
# pass a PostgreSQL URI (postgresql://user:pass@host/db) and a shared artifact root (s3://...).
# The server stores artifacts itself (--serve-artifacts): clients upload through it to
# ARTIFACT_ROOT and need no credentials for the artifact store.
#
# Environment:
#   MLFLOW_HOST           interface to bind (default 127.0.0.1)
#   MLFLOW_PORT           port (default 5000)
#   MLFLOW_ALLOWED_HOSTS  extra Host headers to accept (fnmatch patterns, port included), e.g. a
#                         Kubernetes Service "mlflow:*,mlflow.raypeft.svc.cluster.local:*". MLflow's
#                         default list (localhost, private IPs) is replaced by this one, so
#                         localhost is added back to keep local clients and probes working.
#   MLFLOW_WORKERS        server worker processes (MLflow's default is 4)
#   MLFLOW_APP_NAME       "basic-auth" turns on MLflow's username/password authentication
#   RAYPEFT_MLFLOW_DIR    where the default SQLite file and artifacts live
#
# The server binds to 127.0.0.1: MLflow has no authentication unless MLFLOW_APP_NAME=basic-auth,
# so reach it over an SSH tunnel or put an authenticating proxy in front before binding it to
# another address. Point raypeft at it with `tracking.uri: http://127.0.0.1:5000` or
# MLFLOW_TRACKING_URI, and give runs the server's artifact store with
# `--set tracking.artifact_location=mlflow-artifacts:/raypeft`.
set -euo pipefail
root="${RAYPEFT_MLFLOW_DIR:-$PWD/mlflow-server}"
mkdir -p "$root"
backend="${1:-sqlite:///$root/mlflow.db}"
artifacts="${2:-$root/artifacts}"
extra=()
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  extra+=(--allowed-hosts "localhost,localhost:*,127.0.0.1,127.0.0.1:*,$MLFLOW_ALLOWED_HOSTS")
fi
if [[ -n "${MLFLOW_WORKERS:-}" ]]; then
  extra+=(--workers "$MLFLOW_WORKERS")
fi
if [[ -n "${MLFLOW_APP_NAME:-}" ]]; then
  extra+=(--app-name "$MLFLOW_APP_NAME")
fi
mlflow_bin="$(command -v mlflow || true)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "$mlflow_bin" && -x "$repo/.venv/bin/mlflow" ]]; then
  mlflow_bin="$repo/.venv/bin/mlflow"   # `make install` put it there; the venv need not be active
fi
[[ -n "$mlflow_bin" ]] || { echo "mlflow-server: no 'mlflow' on PATH or in $repo/.venv; install raypeft first (make install)" >&2; exit 2; }
exec "$mlflow_bin" server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  "${extra[@]}"
