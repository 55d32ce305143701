# Sourced by the other scripts: finds Python >= 3.12, creates .venv and installs the package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOBA_VENV:-$ROOT/.venv}"

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

find_python() {
    local c
    # 3.12 first: it is the version megatron-core 0.19 publishes wheels for.
    for c in "${PYTHON:-}" python3.12 python3 python3.13; do
        if [ -n "$c" ] && command -v "$c" >/dev/null && is_312 "$(command -v "$c")"; then
            command -v "$c"; return
        fi
    done
    # pyenv keeps versions that are not on PATH
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    command -v pyenv >/dev/null && root="$(pyenv root)"
    for c in $(ls -d "$root"/versions/3.12*/bin/python "$root"/versions/3.1[3-9]*/bin/python 2>/dev/null); do
        if is_312 "$c"; then echo "$c"; return; fi
    done
    echo "error: no Python >= 3.12 found (megatron-core 0.19 needs it); install one or set PYTHON=" >&2
    return 1
}

if [ ! -x "$VENV/bin/python" ] || ! is_312 "$VENV/bin/python"; then
    PY="$(find_python)"
    echo "creating $VENV with $PY"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.moba-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ]; then
    echo "installing moba-megatron and its requirements into $VENV (first run: a few minutes)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
