# Sourced by launch/*.sh: creates .venv if missing and installs the pinned set plus the project
# (editable) with the extras given as "$1" (e.g. "[test,tfds]"; empty for none).
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# One resolve: the exact pins of requirements.txt, then the project with its extras. torch is
# pinned as 2.13.0: a CPU build where one is on disk or PIP_EXTRA_INDEX_URL points to
# https://download.pytorch.org/whl/cpu; otherwise pip takes PyPI's (larger) default build.
.venv/bin/python -m pip install --quiet -r requirements.txt -e ".${1:-}"
