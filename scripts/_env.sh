# Sourced by the other scripts: create .venv on first use and install swinv2 into it.
# torch is pinned here (users of the package get a range from pyproject.toml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv (first run: installs torch, about a minute)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.swinv2-installed-$1
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
  if [ "$1" = test ]; then
    python -m pip install --quiet -e ".[test]"
  else
    python -m pip install --quiet -e ".[train]"
  fi
  touch "$stamp"
fi
