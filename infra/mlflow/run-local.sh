#!/usr/bin/env bash
# A tracking server without Docker, for one workstation or a single-machine Ray cluster:
# sqlite backend and a local artifact root, served on 127.0.0.1 (the same server the cluster
# tests start). Jobs submitted to a cluster on this machine then use
#   --set tracking.uri=http://127.0.0.1:5000 --allow-local-tracking
#
#   infra/mlflow/run-local.sh [DATA_DIR] [PORT]
set -euo pipefail
DATA_DIR=${1:-$HOME/mlflow-server}
PORT=${2:-5000}
MLFLOW=${MLFLOW:-$(dirname "$0")/../../.venv/bin/mlflow}
mkdir -p "$DATA_DIR/artifacts"
exec "$MLFLOW" server --host 127.0.0.1 --port "$PORT" --workers 1 \
  --backend-store-uri "sqlite:///$DATA_DIR/mlflow.db" \
  --artifacts-destination "$DATA_DIR/artifacts"
