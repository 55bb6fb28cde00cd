"""The suite's float comparisons scale with magnitude or say why they need not.

A comparison with `rtol=0` is absolute only: right for O(1) quantities (unit norms,
cosines) and exact reruns, wrong for large activations, where float32 rounding alone
exceeds a fixed atol (a 2e4 residual has ulps of 2e-3). Each such line carries a
`# tol:` comment within the three lines above it saying why absolute is right there.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent


def test_every_absolute_only_tolerance_is_justified():
    unjustified = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name == "test_tolerances.py":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if re.search(r"rtol\s*=\s*0(?![.\d])", line):
                context = lines[max(0, i - 3) : i + 1]
                if not any("# tol:" in c for c in context):
                    unjustified.append(f"{path.relative_to(TESTS)}:{i + 1}: {line.strip()}")
    assert not unjustified, "absolute-only tolerances without a `# tol:` reason:\n" + "\n".join(
        unjustified
    )
