#!/usr/bin/env bash
# README command 2: builds .venv from the project's own files (if missing), installs the pinned
# set with the test, tfds and serve extras, and runs the whole suite. Extra arguments go to pytest.
# Two pytest-xdist workers by default (PDIFF_TEST_WORKERS=N for more; 0 runs in this process,
# as --pdb and -s need):
# most tests wait on subprocesses, Java or compilation, so two workers on two cores cut the
# suite by about a third here (15.7 -> 10.8 min when last timed both ways; 10.9-16.0 min on two
# on 2026-12-06, 242-246 tests, with the machine's speed). The two cores are then ~95% busy, so
# more workers would not help (BENCHMARKS.md, where the test suite's time goes). Tests marked
# xdist_group share a worker (and its session fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."

source launch/venv.sh "[test,tfds,serve]"

set +e
.venv/bin/python -m pytest -n "${PDIFF_TEST_WORKERS:-2}" --dist loadgroup "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "launch/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$status"
