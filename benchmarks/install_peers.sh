#!/usr/bin/env bash
# Install the peer libraries of the benchmarks (the `bench` extra of pyproject.toml) into the project's
# virtualenv with `pip --no-deps`, so that pip never replaces the torch that is there.
#
#   bash benchmarks/install_peers.sh            # uses .venv/bin/python
#   PYTHON=/path/to/python bash benchmarks/install_peers.sh
#
# The package itself must be installed first (`pip install -e .`, as `make bench` does): the list is read
# from its installed metadata, so pyproject.toml stays the one place where the peers are pinned.
set -euo pipefail

PYTHON="${PYTHON:-.venv/bin/python}"

mapfile -t requirements < <("$PYTHON" - <<'PY'
from importlib.metadata import requires

for requirement in requires("lightning-hessian") or []:
    spec, _, marker = requirement.partition(";")
    if 'extra == "bench"' in marker:
        print(spec.strip().replace(" ", ""))
PY
)
if [ "${#requirements[@]}" -eq 0 ]; then
    echo "install_peers.sh: no 'bench' requirements found; install the package first (pip install -e .)" >&2
    exit 1
fi

"$PYTHON" -m pip install --disable-pip-version-check --no-deps "${requirements[@]}"
"$PYTHON" -c "import pyhessian, hessian_eigenthings, curvlinops, torch; print('peers installed; torch', torch.__version__)"
