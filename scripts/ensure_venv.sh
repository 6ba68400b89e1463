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
  echo "Installing libra_jax${extras:+[$extras]} into $venv (first run takes a few minutes) ..." >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "$root${extras:+[$extras]}" >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
