# Sourced by launch/*.sh: creates .venv if missing and installs the project (editable).
#   source launch/venv.sh ""              runtime dependencies only, at the versions pinned in
#                                         requirements.txt (-c: a constraint, not an install list)
#   source launch/venv.sh "[test,tfds,serve]"   the whole pinned set plus those extras (the test command)
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -z "${1:-}" ]; then
  # What the demo, train, eval and caption import; no tensorflow, torch or test tools (~1 GB less).
  .venv/bin/python -m pip install --quiet -c requirements.txt -e .
else
  # One resolve: the exact pins of requirements.txt, then the project with its extras. torch is
  # pinned as 2.13.0: a CPU build where one is on disk or PIP_EXTRA_INDEX_URL points to
  # https://download.pytorch.org/whl/cpu; otherwise pip takes PyPI's (larger) default build.
  .venv/bin/python -m pip install --quiet -r requirements.txt -e ".$1"
fi
