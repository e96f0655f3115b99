"""Generate the README's lab tables from the committed result files (docs/results/); never reruns the lab.

    python benchmarks/readme_tables.py                    # rewrite the two generated README blocks
    python benchmarks/readme_tables.py --check            # exit 1 if README and docs/results disagree
    python benchmarks/readme_tables.py collect --quick RUN_DIR --full RUN_DIR
                                                          # copy finished runs into docs/results/ first
    python benchmarks/readme_tables.py collect --compression RUN_DIR
                                                          # a full run's compression frontier only
    python benchmarks/readme_tables.py reports [--check]  # re-render docs/results' report.md and summary.md
                                                          # from their results.json / summary.json

The compression block is written into README.md and docs/compression.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deltaport.lab.compression import collect as collect_compression  # noqa: E402
from deltaport.lab.readme import collect, render, replace_blocks, rerender_reports  # noqa: E402

DOCS = {"README.md": None, "docs/compression.md": ("compression",)}  # file -> its blocks (None: all)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", nargs="?", default="render", choices=["render", "collect", "reports"])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--quick")
    ap.add_argument("--full")
    ap.add_argument("--compression")
    a = ap.parse_args()
    if a.action == "collect":
        if a.quick:
            collect(Path(a.quick), ROOT / "docs/results/quick", summary=False)
        if a.full:
            collect(Path(a.full), ROOT / "docs/results/full", summary=True)
        if a.compression:
            collect_compression(Path(a.compression), ROOT / "docs/results/full")
        elif a.full and any(json.loads(p.read_text()).get("compression")
                            for p in Path(a.full).glob("seed-*/results.json")):
            collect_compression(Path(a.full), ROOT / "docs/results/full")
        return 0
    if a.action == "reports":
        return reports(check=a.check)
    blocks = render(ROOT)
    stale = []
    for rel, names in DOCS.items():
        doc = ROOT / rel
        text = doc.read_text()
        new = replace_blocks(text, blocks if names is None else {n: blocks[n] for n in names})
        if new != text:
            stale.append(rel)
            if not a.check:
                doc.write_text(new)
    if a.check:
        if stale:
            print(f"{', '.join(stale)}: lab tables disagree with docs/results/; run python benchmarks/readme_tables.py")
            return 1
        print("README's (and docs/compression.md's) lab tables match docs/results/")
    return 0


def reports(*, check: bool) -> int:
    """Write (or with ``check``, compare) every committed report.md / summary.md as today's code renders it."""
    stale = []
    for path, text in rerender_reports(ROOT).items():
        if not path.exists() or path.read_text() != text:
            stale.append(str(path.relative_to(ROOT)))
            if not check:
                path.write_text(text)
    if check and stale:
        print(f"{', '.join(stale)}: differ from their results; run python benchmarks/readme_tables.py reports")
        return 1
    print(("rewritten: " + ", ".join(stale)) if stale and not check else "reports match their results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
