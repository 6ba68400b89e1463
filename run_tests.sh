#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
python=$(scripts/ensure_venv.sh test)
export TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0
exec "$python" -m pytest -q "$@"
