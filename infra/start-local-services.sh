#!/usr/bin/env bash
# Without Docker: a Prefect server and an MLflow server on this machine, sharing .npuflow/.
# Usage: infra/start-local-services.sh   (Ctrl-C stops both)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
HOME_DIR=${NPUFLOW_HOME:-.npuflow}
mkdir -p "$HOME_DIR"
"$BIN/prefect" server start --host 127.0.0.1 --port 4200 &
"$BIN/mlflow" server --host 127.0.0.1 --port 5000 \
  --backend-store-uri "sqlite:///$PWD/$HOME_DIR/mlflow.db" --artifacts-destination "$PWD/$HOME_DIR/mlartifacts" &
trap 'kill $(jobs -p) 2>/dev/null' EXIT INT TERM
echo "Prefect UI: http://127.0.0.1:4200   MLflow UI: http://127.0.0.1:5000"
echo "export PREFECT_API_URL=http://127.0.0.1:4200/api MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
wait
