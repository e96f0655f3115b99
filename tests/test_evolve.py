"""deltaport.evolve: Algorithm 1 bookkeeping on a 3-version tiny chain, exactly; resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_sd, tree_hash
from deltaport.errors import InputError, OutputError
from deltaport.evolve import load_chain, run_chain, slug, strategy_models
from deltaport.testing import make_model, make_tokenizer, perturbed, save

DATA = Path(__file__).parent / "data" / "tiny_qa"
FACTS = json.loads((DATA / "facts.json").read_text())


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    tok = make_tokenizer(extra_words=list(FACTS))
    m1 = make_model("llama", seed=0)
    m2 = perturbed(m1, seed=1, scale=0.02)
    m3 = perturbed(m2, seed=2, scale=0.02)
    return [save(m, root / n, tokenizer=tok) for n, m in (("m1", m1), ("m2", m2), ("m3", m3))]


def _chain(versions, strategies, steps=3, eval_every=None):
    ft = {"steps": steps, "lr": 3e-3, "batch_size": 4}
    if eval_every:
        ft["eval_every"] = eval_every
    return {"versions": [str(v) for v in versions], "data": str(DATA / "sft.jsonl"), "finetune": ft,
            "eval": {"tasks": [str(DATA / "tiny_qa.yaml")], "limit": 4}, "strategies": strategies,
            "device": "cpu"}


def test_plan_names_models_by_what_they_are(versions):
    plan = strategy_models(load_chain(_chain(versions, ["iterative", "direct", "plain", "transfer-only"])))
    assert plan["plain"] == {"M1": "FT(M1)", "M2": "FT(M2)", "M3": "FT(M3)"}
    assert plan["direct"] == {"M1": "FT(M1)", "M2": "FT(M2+Δ[FT(M1)])", "M3": "FT(M3+Δ[FT(M2)])"}
    assert plan["iterative"] == {"M1": "FT(M1)", "M2": "FT(M2+Δ[FT(M1)])",
                                 "M3": "FT(M3+Δ[FT(M2+Δ[FT(M1)])])"}
    assert plan["transfer-only"] == {"M2": "M2+Δ[FT(M1)]", "M3": "M3+Δ[FT(M2)]"}
    assert slug("FT(M3+Δ[FT(M2)])") == "FT(M3+d(FT(M2)))"


@pytest.mark.slow
def test_algorithm1_bookkeeping_exact(versions, tmp_path):
    run = tmp_path / "run"
    res = run_chain(_chain(versions, ["iterative", "direct", "plain", "transfer-only"], eval_every=3), run)
    M = {f"M{i + 1}": load_sd(v) for i, v in enumerate(versions)}
    model = lambda mid: load_sd(run / "models" / slug(mid))  # noqa: E731
    delta = lambda mid: load_sd(run / "deltas" / slug(mid))  # noqa: E731

    star1 = model("FT(M1)")
    d_iter1 = delta("FT(M1)")  # Δ^iter_1 = M*_1 − M1 = Δ_1 (exact: float64 delta of float32 weights)
    init2 = model("M2+Δ[FT(M1)]")
    star2 = model("FT(M2+Δ[FT(M1)])")  # M*_2 = FT(M2 + Δ^iter_1)
    d_iter2 = delta("FT(M2+Δ[FT(M1)])")  # Δ^iter_2 = M*_2 − M2
    init3 = model("M3+Δ[FT(M2+Δ[FT(M1)])]")
    d_dir2 = delta("FT(M2)")  # Δ_2 = FT(M2) − M2
    init3_dir = model("M3+Δ[FT(M2)]")
    moved = 0
    for k in M["M1"]:
        assert torch.equal(d_iter1[k], star1[k].double() - M["M1"][k].double())
        assert torch.equal(init2[k], (M["M2"][k].double() + d_iter1[k]).float())
        assert torch.equal(d_iter2[k], star2[k].double() - M["M2"][k].double())
        update2 = star2[k].double() - init2[k].double()  # what fine-tuning learned in step 2
        moved += int(update2.abs().max() > 0)
        # Δ^iter accumulates: Δ^iter_2 = Δ^iter_1 + update_2 (up to the float32 rounding of init2)
        torch.testing.assert_close(d_iter2[k], d_iter1[k] + update2, rtol=0, atol=1e-6)
        assert torch.equal(init3[k], (M["M3"][k].double() + d_iter2[k]).float())
        assert torch.equal(init3_dir[k], (M["M3"][k].double() + d_dir2[k]).float())
    assert moved == len(M["M1"])  # every tensor was trained in step 2
    assert not torch.equal(d_iter2["lm_head.weight"], d_dir2["lm_head.weight"])  # iterative ≠ direct at M3

    # provenance, evaluations, curves and the table
    prov = json.loads((run / "models" / slug("FT(M2+Δ[FT(M1)])") / "deltaport.json").read_text())
    assert prov["model"]["path"] == str((run / "models" / slug("M2+Δ[FT(M1)]")).absolute())
    assert set(res["scores"]) == {"M1", "M2", "M3", "FT(M1)", "FT(M2)", "FT(M3)", "FT(M2+Δ[FT(M1)])",
                                  "FT(M3+Δ[FT(M2)])", "FT(M3+Δ[FT(M2+Δ[FT(M1)])])", "M2+Δ[FT(M1)]", "M3+Δ[FT(M2)]"}
    assert all("acc" in s["tiny_qa"] for s in res["scores"].values())
    assert [e["step"] for e in res["curves_data"]["iterative"]["M3"]] == [0, 3]
    for s in ("iterative", "direct", "plain", "M2", "M3"):
        assert (run / f"curves_{s}.png").stat().st_size > 1000
    table = (run / "table.md").read_text()
    assert "| + Δ^iter → FT | — |" in table and "| FT(M_i) |" in table and "| + Δ (no FT) | — |" in table
    steps = [json.loads(x)["step"] for x in (run / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) == len(res["computed"])
    assert steps.count("FT(M1)") == 1  # shared by all strategies, trained once


@pytest.mark.slow
def test_resume_after_kill_never_recomputes(versions, tmp_path, monkeypatch):
    import deltaport.finetune as ftmod

    from transformers import TrainerCallback

    data = tmp_path / "sft.jsonl"
    data.write_text((DATA / "sft.jsonl").read_text())
    chain = dict(_chain(versions, ["iterative", "plain"], steps=2), data=str(data))
    chain["finetune"]["save_every"] = 1  # trainer state after every step: a killed fine-tune resumes mid-way
    run = tmp_path / "run"
    real = ftmod.finetune
    calls, killed = [], []

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if state.global_step == 2:
                raise KeyboardInterrupt

    def dying(*a, **k):
        calls.append(str(a[2]))
        if len(calls) == 3 and not killed:
            killed.append(a[2])  # the 3rd fine-tune of the first run is killed at step 2 (state of step 1 saved)
            return real(*a, callbacks=[Kill()], **k)
        return real(*a, **k)

    monkeypatch.setattr(ftmod, "finetune", dying)
    with pytest.raises(KeyboardInterrupt):
        run_chain(chain, run)
    done = sorted(p.name for p in (run / "models").iterdir() if p.is_dir())
    assert not any(".deltaport-tmp-" in n for n in done)
    assert done == ["FT(M1)", "FT(M2+d(FT(M1)))", "M2+d(FT(M1))"]
    before = {n: tree_hash(run / "models" / n) for n in done}
    with pytest.raises(OutputError, match="--resume"):
        run_chain(chain, run)
    calls.clear()
    res = run_chain(chain, run, resume=True)
    assert {n: tree_hash(run / "models" / n) for n in done} == before
    assert [Path(c).name for c in calls] == ["FT(M2)", "FT(M3+d(FT(M2+d(FT(M1)))))", "FT(M3)"]
    prov = json.loads((run / "models" / "FT(M2)" / "deltaport.json").read_text())
    assert prov["resumed_from_step"] == 1
    assert not (run / "work").exists() or not any((run / "work").iterdir())
    assert "FT(M1)" not in res["computed"] and "FT(M3)" in res["computed"]
    calls.clear()
    again = run_chain(chain, run, resume=True)  # nothing left to do
    assert calls == [] and again["computed"] == [] and again["scores"] == res["scores"]
    changed = dict(chain, finetune={"steps": 3, "lr": 3e-3, "batch_size": 4, "save_every": 1})
    with pytest.raises(InputError, match="different chain"):
        run_chain(changed, run, resume=True)
    data.write_text((DATA / "sft.jsonl").read_text().replace("green", "blue"))  # same path, new content
    with pytest.raises(InputError, match="different data"):
        run_chain(chain, run, resume=True)


def test_unreadable_version_fails_before_writing(versions, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(versions[1], bad)
    for f in bad.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(InputError):
        run_chain(_chain([versions[0], bad], ["plain"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_chain_validation_reports_every_problem(tmp_path):
    with pytest.raises(InputError) as e:
        load_chain({"versions": ["a"], "finetune": {"stepz": 3}, "eval": {}, "strategies": ["magic"]})
    msg = str(e.value)
    for frag in ("at least two base versions", "data:", "unknown key(s) stepz", "eval: give tasks",
                 "strategies: unknown magic"):
        assert frag in msg
    p = tmp_path / "chain.yaml"
    p.write_text("versions: [m1, m2]\ndata: sft.jsonl\neval: {tasks: [t.yaml]}\n")
    (tmp_path / "m1").mkdir()
    c = load_chain(p)  # paths relative to the chain file
    assert c.versions[0] == ("M1", str((tmp_path / "m1").resolve())) and c.versions[1] == ("M2", "m2")


@pytest.mark.slow
def test_cli_evolve(versions, tmp_path):
    import yaml

    from deltaport.cli.main import main

    p = tmp_path / "chain.yaml"
    c = _chain(versions[:2], ["plain", "transfer-only"], steps=1)
    p.write_text(yaml.safe_dump(c))
    assert main(["evolve", str(p), "-o", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "table.md").is_file()
    assert main(["evolve", str(p), "-o", str(tmp_path / "run")]) == 2
    assert main(["evolve", str(p), "-o", str(tmp_path / "run"), "--resume"]) == 0
