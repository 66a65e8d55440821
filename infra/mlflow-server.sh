#!/usr/bin/env bash
# Start an MLflow tracking server for a Ray cluster's runs and adapter registry.
#
#   infra/mlflow-server.sh [BACKEND_URI] [ARTIFACT_ROOT]
#
# Defaults: a SQLite store and a local artifact folder under ./mlflow-server/. For a team,
# pass a PostgreSQL URI (postgresql://user:pass@host/db) and a shared artifact root (s3://...).
# The server binds to 127.0.0.1: MLflow has no authentication of its own, so reach it over an
# SSH tunnel or put an authenticating proxy in front before binding it to another address.
# Point raypeft at it with `tracking.uri: http://127.0.0.1:5000` or MLFLOW_TRACKING_URI.
set -euo pipefail
root="${RAYPEFT_MLFLOW_DIR:-$PWD/mlflow-server}"
mkdir -p "$root"
backend="${1:-sqlite:///$root/mlflow.db}"
artifacts="${2:-$root/artifacts}"
exec mlflow server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}"
