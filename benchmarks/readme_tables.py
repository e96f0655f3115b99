"""Generate the README's lab tables from the committed result files (docs/results/); never reruns the lab.

    python benchmarks/readme_tables.py                    # rewrite the two generated README blocks
    python benchmarks/readme_tables.py --check            # exit 1 if README and docs/results disagree
    python benchmarks/readme_tables.py collect --quick RUN_DIR --full RUN_DIR
                                                          # copy finished runs into docs/results/ first
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deltaport.lab.readme import collect, render, replace_blocks  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", nargs="?", default="render", choices=["render", "collect"])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--quick")
    ap.add_argument("--full")
    a = ap.parse_args()
    if a.action == "collect":
        if a.quick:
            collect(Path(a.quick), ROOT / "docs/results/quick", summary=False)
        if a.full:
            collect(Path(a.full), ROOT / "docs/results/full", summary=True)
        return 0
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = replace_blocks(text, render(ROOT))
    if a.check:
        if new != text:
            print("README's lab tables disagree with docs/results/; run python benchmarks/readme_tables.py")
            return 1
        print("README's lab tables match docs/results/")
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
