#!/usr/bin/env bash
# The test command of muxtunnel (README.md "Tests"; .ci/run runs exactly this).
#
#   bash scripts/test.sh [--fresh] [PYTEST_ARGS...]
#
# 1. a virtualenv in build/venv-ci (recreated when CI=true or with --fresh, else reused),
# 2. pip install -e '.[test]' from this checkout,
# 3. ruff format --check, ruff check, mypy (strict, muxtunnel/ and tests/; config in pyproject.toml),
# 4. the test suite: python -bb -m coverage run -m pytest (JUnit report in build/); the whole
#    suite runs as two concurrent pytest runs (see "pytest under coverage" below),
# 5. gates: at least one test passed and none failed; 100% line+branch coverage of
#    muxtunnel/protocol/; a coverage floor for the package (benchsuite/ aside).
# With PYTEST_ARGS (a subset of the tests) the coverage gates are skipped.
#
# Environment: PYTHON (interpreter for the venv, default python3, needs >= 3.11),
# MUXTUNNEL_VENV (venv dir), MUXTUNNEL_COVERAGE_FLOOR (package floor, default below),
# MUXTUNNEL_SUBPROCESS_COVERAGE=1 (also measure the muxtunnel processes tests start; slower),
# MUXTUNNEL_TEST_SPLIT=0 (the whole suite in one pytest run instead of two at once).
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
if [ "$#" -gt 0 ] || [ "${MUXTUNNEL_TEST_SPLIT:-1}" = "0" ]; then
    "$PY" -bb -m coverage run -m pytest --junitxml="$REPORT" "$@"
else
    # The whole suite as two pytest runs at once. Most of the time of tests/faults/ (outages in
    # network namespaces) and tests/system/ (real processes and services) is spent waiting, not
    # computing, so on two cores the pair takes about as long as the longer run alone. Each run
    # picks the public port ranges of its relays in its own window (MUXTUNNEL_TEST_PORTS, read
    # by tests/conftest.py and tests/system/harness.py); the fault tests' namespaces carry
    # per-run names; coverage writes one data file per process (parallel = true), combined
    # below. The side run's output follows the main run's; the JUnit reports are merged.
    side_paths=(tests/faults tests/system)
    side_report="${REPORT%.xml}-side.xml"
    side_log="$(dirname "$REPORT")/pytest-side.log"
    rm -f "$side_report" "$side_log"
    ignore=()
    for path in "${side_paths[@]}"; do
        ignore+=(--ignore="$path")
    done
    echo "(${side_paths[*]} run alongside; output below when done, meanwhile in $side_log)"
    MUXTUNNEL_TEST_PORTS=20000-29999 "$PY" -bb -m coverage run -m pytest -p no:cacheprovider \
        --junitxml="$side_report" "${side_paths[@]}" >"$side_log" 2>&1 &
    side_pid=$!
    # Interrupted: stop the side run too (by its PID; the fault tests remove their namespaces).
    trap 'kill -TERM "$side_pid" 2>/dev/null || true; exit 130' INT
    trap 'kill -TERM "$side_pid" 2>/dev/null || true; exit 143' TERM
    main_status=0
    MUXTUNNEL_TEST_PORTS=10000-19999 "$PY" -bb -m coverage run -m pytest \
        --junitxml="$REPORT" "${ignore[@]}" || main_status=$?
    side_status=0
    echo "(waiting for the ${side_paths[*]} run, pid $side_pid)"
    wait "$side_pid" || side_status=$?
    trap - INT TERM
    step "pytest ${side_paths[*]} (ran alongside; exit status $side_status)"
    cat "$side_log"
    if [ "$main_status" -ne 0 ] || [ "$side_status" -ne 0 ]; then
        echo "scripts/test.sh: pytest failed (exit status $main_status;" \
            "${side_paths[*]}: $side_status)" >&2
        exit 1
    fi
    # One report with both runs' test suites (scripts/check_junit.py reads every testcase).
    "$PY" -c '
import sys, xml.etree.ElementTree as ET
merged = ET.Element("testsuites")
for path in sys.argv[1:]:
    merged.extend(ET.parse(path).getroot().iter("testsuite"))
ET.ElementTree(merged).write(sys.argv[1], encoding="utf-8", xml_declaration=True)
' "$REPORT" "$side_report"
fi

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
