#!/usr/bin/env bash
# Sets cryoposeml up on Debian with Python 3.11 (idempotent), then runs what you ask:
#   bash bootstrap.sh demo [DIR]   set up, then run the demo end to end on bundled data
#   bash bootstrap.sh test [ARGS]  set up, then run the test suite (ARGS go to pytest)
#   bash bootstrap.sh setup        set up only
# Environment:
#   CRYOPOSEML_PYTHON      interpreter for the venv (default: python3.11, else python3)
#   CRYOPOSEML_TORCH       pip spec for torch (default torch==2.13.0: the CPU build here)
#   CRYOPOSEML_TEST_WORKERS pytest-xdist workers for the tests (default 2)
#   CRYOPOSEML_TORCH_INDEX extra index for a CUDA build of torch, e.g.
#                          https://download.pytorch.org/whl/cu128 (with CRYOPOSEML_TORCH=torch)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
what=${1:-setup}; shift || true

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. System packages: Relion (CPU, 3.1.x) and MPI for the referee/handoff; gfortran for escnn's py3nj;
#    Xvfb for the GUI test (the Scipion forms in a real window).
APT_PKGS="relion openmpi-bin gfortran xvfb"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[bootstrap] apt-get install:$missing"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

# 2. Virtual environment in the checkout, packages pinned in constraints.txt, plugin editable.
PY=${CRYOPOSEML_PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH=${CRYOPOSEML_TORCH:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=$(cat setup.py constraints.txt | sha256sum | cut -c1-16)-$(echo "$TORCH ${CRYOPOSEML_TORCH_INDEX:-}" | sha256sum | cut -c1-8)
if [ "$(cat .venv/.cryoposeml-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "[bootstrap] installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  idx=(); [ -n "${CRYOPOSEML_TORCH_INDEX:-}" ] && idx=(--extra-index-url "$CRYOPOSEML_TORCH_INDEX")
  # torch first and alone, so nothing else can pull a CUDA build on a CPU machine.
  .venv/bin/python -m pip install -q "${idx[@]}" $TORCH
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[engine,scipion,test]"
  .venv/bin/python -m pip check
  echo "$stamp" > .venv/.cryoposeml-stamp
fi

# 3. Headless Scipion lives inside the checkout (ignored by git).
export SCIPION_DOMAIN=pwem
export SCIPION_HOME=${SCIPION_HOME:-$ROOT/scipion_home}
export SCIPION_USER_DATA=${SCIPION_USER_DATA:-$SCIPION_HOME/data}
export SCIPION_TESTS=${SCIPION_TESTS:-$SCIPION_HOME/tests}
export SCIPION_PYTHON=$ROOT/.venv/bin/python
mkdir -p "$SCIPION_USER_DATA" "$SCIPION_TESTS" "$SCIPION_HOME/config"

case "$what" in
  setup) echo "[bootstrap] ready: $ROOT/.venv/bin/cryoposeml" ;;
  demo) exec .venv/bin/cryoposeml demo --out "${1:-demo_out}" ;;
  # Two workers, one test file each at a time (a file's fixtures are built once): the suite waits on
  # subprocesses, Relion and Scipion much of the time, so the second core works while the first waits.
  # One thread per process then: two workers' OpenMP teams of two on two cores spin against each other.
  test)
    workers=${CRYOPOSEML_TEST_WORKERS:-2}
    if [ "$workers" != 1 ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}; fi
    exec .venv/bin/python -m pytest -ra --durations=25 -n "$workers" --dist loadfile "$@" ;;
  *) echo "usage: bash bootstrap.sh {setup|demo [DIR]|test [PYTEST ARGS]}" >&2; exit 2 ;;
esac
