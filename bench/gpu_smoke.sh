#!/usr/bin/env bash
# GPU smoke test (bench/gpu_smoke.py) on a bare CUDA machine: torch, transformers and safetensors are there,
# pydantic and a package registry may not be. Two uses:
#   bash bench/gpu_smoke.sh --fetch      here (with a registry): download the few wheels it lacks into bench/wheels/
#                                        (pydantic and its small dependencies, ~2.8 MB, for CPython 3.12)
#   bash bench/gpu_smoke.sh [ARGS...]    there: unpack bench/wheels/ into a temp dir when pydantic is missing
#                                        (a wheel is a zip: no pip needed), then run bench/gpu_smoke.py ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/wheels
if [ "${1:-}" = "--fetch" ]; then
  PY=${PYTHON:-python3}
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" \
    "pydantic>=2.7,<3"
  ls -la "$WHEELS"
  exit 0
fi
PY=${PYTHON:-python3}
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "error: pydantic is missing and $WHEELS/ is empty: run 'bash bench/gpu_smoke.sh --fetch' where a registry is reachable" >&2; exit 2; }
  site=$(mktemp -d)
  "$PY" - "$WHEELS" "$site" <<'PYEOF'
import sys, zipfile, pathlib
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    zipfile.ZipFile(whl).extractall(sys.argv[2])
PYEOF
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" bench/gpu_smoke.py "$@"
