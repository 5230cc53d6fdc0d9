#!/usr/bin/env bash
# Lint and run the test suite (slow tests are deselected; add -m slow to run only them).
. "$(dirname "$0")/_env.sh" test
ruff check .
python -m pytest -q "$@"
