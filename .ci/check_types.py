"""The type gate of CI (issue 27): mypy on models/ and utils/ (settings in pyproject.toml) against a baseline.

``.ci/mypy_baseline.txt`` lists the errors accepted today, one per line as ``path: [code] message`` (no line
numbers, so that edits elsewhere in a file do not churn it), repeated as often as they occur. The gate fails on an
error that is not in the baseline (a new one). A baseline entry that no longer occurs is listed, not failed (an
unpinned dependency such as timm may change its stubs): drop it with ``--shrink``, which never adds an entry, so the
baseline only shrinks.

    .venv/bin/python .ci/check_types.py            # exit 0, or 1 with the new errors listed
    .venv/bin/python .ci/check_types.py --shrink   # drop the fixed entries from the baseline
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / ".ci" / "mypy_baseline.txt"
LINE = re.compile(r"^(?P<path>[^:]+):\d+(?::\d+)?: error: (?P<message>.*?)\s+\[(?P<code>[a-z-]+)\]$")


def current_errors() -> Counter:
    """mypy's errors now, as ``path: [code] message`` with their counts."""
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty"], cwd=ROOT,
                          capture_output=True, text=True)
    found: Counter = Counter()
    for line in proc.stdout.splitlines():
        match = LINE.match(line.strip())
        if match:
            found[f"{match['path']}: [{match['code']}] {match['message']}"] += 1
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not found):
        raise SystemExit(f"mypy did not run (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return found


def read_baseline() -> Counter:
    if not BASELINE.is_file():
        return Counter()
    return Counter(line for line in BASELINE.read_text().splitlines() if line.strip() and not line.startswith("#"))


def write_baseline(errors: Counter) -> None:
    lines = [entry for entry in sorted(errors) for _ in range(errors[entry])]
    BASELINE.write_text("# mypy errors accepted on models/ and utils/ (.ci/check_types.py); it may only shrink\n"
                        + "\n".join(lines) + ("\n" if lines else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shrink", action="store_true", help="drop the baseline entries that no longer occur")
    parser.add_argument("--init", action="store_true", help="write the baseline from scratch (first use only)")
    args = parser.parse_args(argv)
    now, base = current_errors(), read_baseline()
    if args.init:
        if BASELINE.is_file():
            print(f"error: {BASELINE} exists; it may only shrink (use --shrink)", file=sys.stderr)
            return 2
        write_baseline(now)
        print(f"wrote {BASELINE}: {sum(now.values())} errors")
        return 0
    new, fixed = now - base, base - now
    if args.shrink:
        write_baseline(base - fixed)
        print(f"removed {sum(fixed.values())} fixed entries; {sum((base - fixed).values())} remain")
        return 1 if new else 0
    for entry in sorted(new):
        print(f"new: {entry}")
    for entry in sorted(fixed):
        print(f"fixed (remove it with --shrink): {entry}")
    print(f"mypy: {sum(now.values())} errors, baseline {sum(base.values())}; {sum(new.values())} new, "
          f"{sum(fixed.values())} fixed")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
