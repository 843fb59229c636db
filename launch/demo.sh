#!/usr/bin/env bash
# README command 1: from a fresh clone, creates .venv if missing, installs, and runs the whole
# pipeline on the embedded synthetic data into ./demo_out (re-running resumes). Extra arguments
# go to `pdiff demo` (e.g. --fast).
set -euo pipefail
cd "$(dirname "$0")/.."

source launch/venv.sh ""
exec .venv/bin/pdiff demo --workdir=demo_out "$@"
