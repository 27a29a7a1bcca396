"""Per-row cost of the test suite, from the JSON lines that tests/conftest.py writes.

    MTLOPT_COMPILE_REPORT=/tmp/cost.jsonl python -m pytest -q -n 2 -m "not slow"
    python tests/cost_report.py /tmp/cost.jsonl

Prints, per registry row, the XLA programs (compiles + persistent-cache hits), the real
compiles and the seconds summed over the tests parametrized by that row, then the rest of the
suite and a projection of the summed test seconds to more rows (at the mean cost of the rows
that are not representatives).
"""

from __future__ import annotations

import collections
import json
import sys


def main(path: str, project_to: int = 40) -> None:
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    rows: dict = collections.defaultdict(lambda: collections.Counter())
    rest = collections.Counter()
    for line in lines:
        row = line.get("row")
        target = rows[row] if row is not None else rest
        target["tests"] += 1
        target["seconds"] += line["seconds"]
        target["compiles"] += line["compiles"]
        target["programs"] += line.get("programs", line["compiles"])
    print(f"{'row':<18} {'tests':>5} {'programs':>8} {'compiles':>8} {'seconds':>8}")
    for name, c in sorted(rows.items(), key=lambda kv: -kv[1]["seconds"]):
        print(
            f"{name:<18} {c['tests']:5d} {c['programs']:8d} {c['compiles']:8d} {c['seconds']:8.1f}"
        )
    total = sum(line["seconds"] for line in lines)
    print(
        f"{'(no row)':<18} {rest['tests']:5d} {rest['programs']:8d} {rest['compiles']:8d} "
        f"{rest['seconds']:8.1f}"
    )
    print(f"summed test seconds: {total:.1f} over {len(lines)} tests")
    if rows:
        n = len(rows)
        mean_s = sum(c["seconds"] for c in rows.values()) / n
        mean_p = sum(c["programs"] for c in rows.values()) / n
        print(f"mean per row: {mean_p:.1f} programs, {mean_s:.1f} s")
        extra = (project_to - n) * mean_s
        print(
            f"projected to {project_to} rows: {total + extra:.0f} summed test seconds "
            f"(~{(total + extra) / 2 / 60:.1f} min on 2 workers, before start-up)"
        )


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
