#!/usr/bin/env bash
# README command 2: builds .venv from the project's own files (if missing), installs the pinned
# set with the test and tfds extras, and runs the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# One resolve: the exact pins of requirements.txt, then the project (editable) with its extras.
# torch is pinned as 2.13.0: a CPU build where one is on disk or PIP_EXTRA_INDEX_URL points to
# https://download.pytorch.org/whl/cpu; otherwise pip takes PyPI's (larger) default build.
.venv/bin/python -m pip install --quiet -r requirements.txt -e ".[test,tfds]"

set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "launch/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$status"
