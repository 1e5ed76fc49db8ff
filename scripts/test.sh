#!/usr/bin/env bash
# The default test suite: offline, CPU, a few minutes. Extra pytest arguments pass through (e.g. -m slow).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true \
  PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
# One torch thread: the suite's models are tiny (threading overhead dominates) and it keeps the suite fast when
# the machine is shared; measured 2.6 min for the whole suite on 2 cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/ruff check prunecomp flows tasks tests bench || exit 1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
