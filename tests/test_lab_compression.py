"""The lab's compression experiment (deltaport.lab.compression): invariants only, never research outcomes.

One CI-sized lab run (the ``ci`` preset's family, grid + compression at three settings) is shared by the
tests: the exact-Δ end is the grid's own cells bit for bit, the "no Δ" end the targets' scores, bytes are
the files' sizes, the compressed deltas are ``deltaport.compress``'s, and a rerun is identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from deltaport.lab import compression as C
from deltaport.lab.config import LabConfigError, load_config

SETTINGS = [{"method": "lowrank", "rank": 2}, {"method": "sparse", "density": 0.5},
            {"method": "sign", "include": ["."]}]


def _cfg():
    return dataclasses.replace(load_config("ci"), experiments=["grid", "compression"], compression=SETTINGS)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from deltaport.lab.run import run_lab

    run_dir = tmp_path_factory.mktemp("lab-compression")
    return run_dir, run_lab(_cfg(), run_dir)


def _files_digest(run_dir: Path) -> dict[str, str]:
    out = {}
    for d in sorted((run_dir / "deltas").glob("*~*")) + sorted((run_dir / "models").glob("*~*")):
        for f in sorted(d.glob("*.safetensors")):
            out[str(f.relative_to(run_dir))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_exact_end_is_the_grids_transfer_cell_bit_for_bit(run):
    _, r = run
    c, g = r["compression"], r["grid"]
    exact = c["rows"][0]
    assert exact["label"] == "exact Δ" and exact["method"] is None
    cells = {(t, s) for t in g["targets"] for s in g["sources"] if s != t}
    assert {tuple(x) for x in c["cells"]} == cells  # every transfer cell, Mx and M0 included
    for t, s in cells:
        assert exact["cells"][t][s] == g["cells"][t][s]  # same float: same models, same scorer
    assert exact["ratio"] == 1.0 and exact["gain_retained"] == 1.0


def test_no_delta_end_is_the_targets_score(run):
    _, r = run
    none = r["compression"]["rows"][1]
    assert none["label"] == "no Δ" and none["bytes"] == 0
    for t, row in none["cells"].items():
        assert set(row.values()) == {r["grid"]["base"][t]}
    assert none["gain_retained"] == 0.0


def test_bytes_are_the_tensor_files_sizes(run):
    run_dir, r = run
    rows = r["compression"]["rows"]
    V = r["config"]["versions"]
    exact = [sum(f.stat().st_size for f in (run_dir / "deltas" / f"D{v[1:]}").glob("*.safetensors")) for v in V]
    assert rows[0]["bytes"] == sum(exact) / len(exact)
    for row, s in zip(rows[2:], SETTINGS):
        assert row["label"] == C.label(s) and row["setting"] == s
        for v in V:
            d = run_dir / "deltas" / f"D{v[1:]}~{C.slug(s)}"
            files = list(d.glob("*.safetensors"))
            assert files and row["bytes_per_delta"][v] == sum(f.stat().st_size for f in files)
        assert row["bytes"] == sum(row["bytes_per_delta"].values()) / len(V)
        assert row["ratio"] == row["bytes"] / rows[0]["bytes"]


def test_compressed_deltas_are_the_librarys_and_every_cell_applies_one(run):
    run_dir, r = run
    for s in SETTINGS:
        for v in r["config"]["versions"]:
            comp = json.loads((run_dir / "deltas" / f"D{v[1:]}~{C.slug(s)}" / "deltaport.json").read_text())["compression"]
            assert comp["method"] == s["method"] and comp["seed"] == r["config"]["seed"]
            assert comp["include"] == s.get("include", [])
            assert comp["params"] == {k: s[k] for k in ("rank", "density") if k in s}
        for t, src in r["compression"]["cells"]:
            m = run_dir / "models" / f"{t}+D{src[1:]}~{C.slug(s)}"
            prov = json.loads((m / "deltaport.json").read_text())
            assert prov["operation"] == "apply" and Path(prov["inputs"]["delta"]["path"]).name == f"D{src[1:]}~{C.slug(s)}"


def test_rerun_recompresses_to_identical_bytes_and_table(run):
    from deltaport.lab.run import run_lab

    run_dir, r = run
    before = _files_digest(run_dir)
    assert len(before) == len(SETTINGS) * (len(r["config"]["versions"]) + len(r["compression"]["cells"]))
    for d in list((run_dir / "deltas").glob("*~*")) + list((run_dir / "models").glob("*~*")):
        shutil.rmtree(d) if d.is_dir() else d.unlink()
    again = run_lab(_cfg(), run_dir)
    assert again["cache"].get("computed_compressed_deltas") == len(SETTINGS) * len(r["config"]["versions"])
    assert _files_digest(run_dir) == before

    def strip(c):
        return {k: v for k, v in c.items() if k != "timings_s"}

    assert strip(again["compression"]) == strip(r["compression"])


def test_report_figure_and_multi_seed_combination(run, tmp_path):
    run_dir, r = run
    rep = (run_dir / "report.md").read_text()
    assert "What compressing Δ costs the transfer" in rep and "figures/compression.png" in rep
    assert (run_dir / "figures" / "compression.png").stat().st_size > 0
    for lab in ["exact Δ", "no Δ"] + [C.label(s) for s in SETTINGS]:
        assert f"| {lab} |" in rep
    # two "seeds" that are the same table: the combination is that table, min = max = mean
    comb = C.combine([r["compression"], r["compression"]])
    for a, b in zip(comb["rows"], r["compression"]["rows"]):
        assert a["label"] == b["label"] and a["score"] == a["score_min"] == a["score_max"] == b["mean"]
        assert a["bytes"] == b["bytes"]
    # collect writes the committed file and figure from seed-* directories
    for k in (0, 1):
        d = tmp_path / "run" / f"seed-{k}"
        d.mkdir(parents=True)
        res = dict(r, config=dict(r["config"], seed=k), compression=dict(r["compression"], seed=k))
        (d / "results.json").write_text(json.dumps(res))
    doc = C.collect(tmp_path / "run", tmp_path / "dest")
    assert json.loads((tmp_path / "dest" / "compression.json").read_text())["combined"] == doc["combined"]
    assert doc["combined"]["seeds"] == [0, 1] and (tmp_path / "dest" / "compression.png").stat().st_size > 0
    assert "| exact Δ |" in C.readme_block(doc)


def test_recommendation_is_the_smallest_setting_meeting_the_rule():
    def row(label, method, nbytes, gain):
        return {"label": label, "method": method, "bytes": nbytes, "gain_retained": gain}

    rows = [row("exact Δ", None, 100, 1.0), row("no Δ", None, 0, 0.0), row("a", "sign", 5, 0.5),
            row("b", "lowrank", 30, 0.96), row("c", "lowrank", 20, C.RECOMMEND_MIN_GAIN_RETAINED),
            row("d", "sparse", 60, 1.02)]
    assert C.recommend(rows) == "c"
    assert C.recommend(rows[:3]) is None  # the exact Δ itself is never "recommended"


def test_bad_compression_settings_are_listed_together(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nexperiments: [grid, compression]\ncompression:\n"
                   "  - {method: lowrank}\n  - {method: zip}\n  - {method: sparse, density: 2}\n"
                   "  - {method: sign, rank: 3}\n  - {method: sign}\n  - {method: sign}\n")
    with pytest.raises(LabConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    for part in ("compression[0]: lowrank needs rank", "compression[1]: need a mapping with method",
                 "compression[2]: sparse needs density", "compression[3]: unknown key(s) rank",
                 "compression[5]: listed twice"):
        assert part in msg


def test_committed_frontier_matches_readme_and_docs():
    from deltaport.lab.readme import COMPRESSION, render, replace_blocks

    root = Path(__file__).resolve().parents[1]
    if not (root / COMPRESSION).exists():
        pytest.skip("no committed compression frontier")
    blocks = render(root)
    assert blocks["compression"]
    for rel in ("README.md", "docs/compression.md"):
        text = (root / rel).read_text()
        assert replace_blocks(text, {"compression": blocks["compression"]}) == text, (
            f"{rel}: compression frontier disagrees with {COMPRESSION}: run `python benchmarks/readme_tables.py`")
