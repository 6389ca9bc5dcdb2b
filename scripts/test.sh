#!/usr/bin/env bash
# The test command of muxtunnel (README.md "Tests"; .ci/run runs exactly this).
#
#   bash scripts/test.sh [--fresh] [PYTEST_ARGS...]
#
# 1. a virtualenv in build/venv-ci (recreated when CI=true or with --fresh, else reused),
# 2. pip install -e '.[test]' from this checkout,
# 3. ruff format --check, ruff check, mypy (strict, muxtunnel/ and tests/; config in pyproject.toml),
# 4. the test suite: python -bb -m coverage run -m pytest (JUnit report in build/),
# 5. gates: at least one test passed and none failed; 100% line+branch coverage of
#    muxtunnel/protocol/; a coverage floor for the package (benchsuite/ aside).
# With PYTEST_ARGS (a subset of the tests) the coverage gates are skipped.
#
# Environment: PYTHON (interpreter for the venv, default python3, needs >= 3.11),
# MUXTUNNEL_VENV (venv dir), MUXTUNNEL_COVERAGE_FLOOR (package floor, default below),
# MUXTUNNEL_SUBPROCESS_COVERAGE=1 (also measure the muxtunnel processes tests start; slower).
# With CI=true a skipped test fails the run (CI installs every dependency).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${MUXTUNNEL_VENV:-build/venv-ci}
COVERAGE_FLOOR=${MUXTUNNEL_COVERAGE_FLOOR:-80}
REPORT=build/test-results/junit.xml

fresh=0
if [ "${CI:-}" = "true" ]; then
    fresh=1
fi
if [ "${1:-}" = "--fresh" ]; then
    fresh=1
    shift
fi

step() { printf '\n==> %s\n' "$*"; }

step "Python"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "scripts/test.sh: $PYTHON is missing or older than 3.11 (set PYTHON=python3.11 or newer)" >&2
    exit 1
fi
"$PYTHON" --version

step "virtualenv $VENV"
if [ "$fresh" -eq 1 ] || [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! "$PYTHON" -m venv "$VENV"; then
        echo "scripts/test.sh: cannot create a virtualenv; on Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    fi
fi
PY="$VENV/bin/python"

step "pip install -e '.[test]'"
"$PY" -m pip install --disable-pip-version-check --quiet --upgrade pip
"$PY" -m pip install --disable-pip-version-check --quiet -e '.[test]'

step "ruff format --check ."
"$VENV/bin/ruff" format --check .
step "ruff check ."
"$VENV/bin/ruff" check .
step "mypy (muxtunnel/ and tests/, files listed in pyproject.toml)"
"$VENV/bin/mypy"

step "pytest under coverage"
mkdir -p "$(dirname "$REPORT")"
rm -f "$REPORT"
"$PY" -m coverage erase
if [ "${MUXTUNNEL_SUBPROCESS_COVERAGE:-0}" = "1" ]; then
    # coverage's .pth hook starts measuring in every Python child that sees this variable;
    # an absolute data file keeps children with another working directory in the same place.
    export COVERAGE_PROCESS_START="$PWD/pyproject.toml"
    export COVERAGE_FILE="$PWD/.coverage"
fi
# pytest exits non-zero when a test fails and 5 when none was collected; set -e stops here.
"$PY" -bb -m coverage run -m pytest --junitxml="$REPORT" "$@"

step "gate: tests ran and passed"
skip_flag=()
if [ "${CI:-}" = "true" ]; then
    skip_flag=(--no-skips)
fi
"$PY" scripts/check_junit.py "$REPORT" "${skip_flag[@]}"

"$PY" -m coverage combine --quiet
if [ "$#" -gt 0 ]; then
    step "coverage gates skipped (a subset of the tests ran: $*)"
    "$PY" -m coverage report --skip-covered
    exit 0
fi
step "gate: 100% line+branch coverage of muxtunnel/protocol/"
"$PY" -m coverage report --include='muxtunnel/protocol/*' --fail-under=100
step "gate: package coverage >= ${COVERAGE_FLOOR}% (without muxtunnel/benchsuite/)"
# The benchmark suite runs as `muxtunnel bench --quick` in .ci/run, outside the test suite,
# so it is left out of the floor.
"$PY" -m coverage report --omit='muxtunnel/benchsuite/*' --fail-under="$COVERAGE_FLOOR"

step "all checks passed"
