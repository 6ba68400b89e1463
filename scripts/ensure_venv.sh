#!/usr/bin/env bash
# Creates .venv on first use and (re)installs the project into it whenever
# pyproject.toml changes. Usage: scripts/ensure_venv.sh [EXTRAS], e.g. "test".
# Prints the path of the venv's python.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
extras="${1:-}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "libra_jax needs Python >= 3.11; $python is $("$python" --version 2>&1). Set PYTHON=/path/to/python3.11." >&2
    exit 1
  }
  echo "Creating $venv ..." >&2
  "$python" -m venv "$venv"
fi

stamp="$venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
  log="$venv/install.log"
  echo "Installing libra_jax${extras:+[$extras]} into $venv (first run takes a few minutes; log: $log) ..." >&2
  if ! { "$venv/bin/python" -m pip install --upgrade pip &&
         "$venv/bin/python" -m pip install -e "$root${extras:+[$extras]}"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "Installing libra_jax failed; the whole log is $log" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "$venv/bin/python"
