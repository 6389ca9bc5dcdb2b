"""Fail unless a pytest JUnit XML report shows at least one passed test and no failures.

Usage: python scripts/check_junit.py REPORT.xml [--no-skips]

``--no-skips`` also fails on skipped tests (xfails excepted): CI installs every system
dependency, so a skip there means a test silently did not run.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def main(argv: list[str]) -> int:
    """Check the report named in ``argv``; print a summary; return the exit status."""
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    no_skips = "--no-skips" in argv[1:]
    root = ET.parse(argv[0]).getroot()
    cases = list(root.iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [
        c for c in cases if (s := c.find("skipped")) is not None and s.get("type") != "pytest.xfail"
    ]
    xfailed = [
        c for c in cases if (s := c.find("skipped")) is not None and s.get("type") == "pytest.xfail"
    ]
    passed = len(cases) - len(failed) - len(skipped) - len(xfailed)
    print(
        f"junit: {len(cases)} test(s): {passed} passed, {len(failed)} failed/errored, "
        f"{len(skipped)} skipped, {len(xfailed)} xfailed"
    )
    status = 0
    if failed:
        status = 1
    if passed <= 0:
        print("junit: FAIL: no test passed (did any test run?)", file=sys.stderr)
        status = 1
    if skipped:
        for case in skipped:
            reason = case.find("skipped")
            message = reason.get("message", "") if reason is not None else ""
            print(f"  skipped: {case.get('classname')}::{case.get('name')}: {message}")
        if no_skips:
            print(
                "junit: FAIL: tests were skipped where every dependency should exist",
                file=sys.stderr,
            )
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
