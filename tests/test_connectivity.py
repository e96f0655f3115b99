"""deltaport.connectivity: exact endpoints, zero barrier on A vs A, the lerp path, errors, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deltaport import causal_lm
from deltaport import testing as T
from deltaport.connectivity import alphas_for, barrier_of, connectivity, interpolate_into
from deltaport.errors import InputError, PlanError

from conftest import tree_hash

WORDS = "the a of is what color flag red green blue yellow white black Q A : ? . , hello world".split()


def texts(n: int = 40, seed: int = 0, length: int = 24) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(n)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two saved tiny llamas (B = A + noise) and a JSONL text file."""
    root = tmp_path_factory.mktemp("conn")
    a = T.make_model("llama", seed=0)
    b = T.perturbed(a, seed=3, scale=0.05)
    pa, pb = T.save(a, root / "a"), T.save(b, root / "b")
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    return pa, pb, data


def reference_nll(model, blocks) -> float:
    """Mean NLL written out independently: one sequence at a time, log_softmax + gather."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logp = torch.log_softmax(model(input_ids=b[None]).logits[0, :-1].double(), -1)
            tot += float(-logp.gather(1, b[1:, None]).sum())
            n += b.numel() - 1
    return tot / n


def test_alphas_are_exact_and_evenly_spaced():
    al = alphas_for(11)
    assert al[0] == 0.0 and al[-1] == 1.0 and len(al) == 11
    assert al[5] == 0.5
    with pytest.raises(InputError, match="at least 2"):
        alphas_for(1)


def test_a_vs_a_has_zero_barrier_and_a_flat_curve(pair):
    pa, _, data = pair
    r = connectivity(pa, pa, data, points=5, max_tokens=512)
    assert r["barrier"] == 0.0
    assert r["losses"] == [r["loss_a"]] * 5  # lerp(a, a, w) == a bit for bit
    assert r["loss_a"] == r["loss_b"]


def test_endpoints_equal_losses_of_a_and_b_exactly(pair):
    pa, pb, data = pair
    r = connectivity(pa, pb, data, points=4, max_tokens=600, seed=1)
    assert r["losses"][0] == r["loss_a"]
    assert r["losses"][-1] == r["loss_b"]
    assert r["endpoints_exact"] is True
    assert r["loss_a"] != r["loss_b"]
    # ... and the losses are the mean token NLL of the stored models on the same sample
    tok = causal_lm.load_tokenizer(pa)
    blocks = causal_lm.token_sample(causal_lm.load_texts(data), tok, max_tokens=600, seed=1, block_len=r["block_len"])
    for path, key in ((pa, "loss_a"), (pb, "loss_b")):
        model = causal_lm.load_causal_lm(path)
        assert r[key] == pytest.approx(reference_nll(model, blocks), rel=1e-6)
    assert r["n_tokens"] == 600 and r["n_predicted"] == 600 - len(blocks)
    # barrier is the largest gap above the straight line, measured on the reported curve
    gaps = [l - lin for l, lin in zip(r["losses"], r["linear"])]
    assert r["barrier"] == pytest.approx(max(max(gaps), 0.0), abs=1e-12)


def test_interpolate_into_is_lerp_and_copies_at_the_ends():
    a = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    b = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    dst = {k: torch.empty_like(v) for k, v in a.items()}
    interpolate_into(dst, a, b, 0.25)
    for k in a:
        torch.testing.assert_close(dst[k], 0.75 * a[k] + 0.25 * b[k], rtol=1e-6, atol=1e-6)
    interpolate_into(dst, a, b, 1.0)
    assert all(torch.equal(dst[k], b[k]) for k in a)
    interpolate_into(dst, a, b, 0.0)
    assert all(torch.equal(dst[k], a[k]) for k in a)


def test_barrier_of_measures_against_the_chord():
    b, at = barrier_of([0.0, 0.5, 1.0], [1.0, 3.0, 2.0], 1.0, 2.0)
    assert b == pytest.approx(1.5) and at == 0.5
    b, _ = barrier_of([0.0, 0.5, 1.0], [1.0, 1.2, 2.0], 1.0, 2.0)  # below the chord: no barrier
    assert b == 0.0


def test_in_memory_models_are_not_modified_and_task_metric_is_called():
    a = T.make_model("llama", seed=0)
    b = T.perturbed(a, seed=1, scale=0.1)
    a.train()
    before = {k: v.clone() for k, v in a.state_dict().items()}
    seen = []

    def task(model):
        seen.append(model)
        return float(next(model.parameters()).detach().sum())

    ids = [[(i * 7 + j) % 60 + 3 for j in range(20)] for i in range(10)]
    r = connectivity(a, b, ids, points=3, max_tokens=150, task=task)
    assert len(r["metrics"]) == 3 and len(seen) == 5
    assert r["metrics"][0] == r["metric_a"] and r["metrics"][-1] == r["metric_b"]
    assert a.training  # training flag restored
    after = a.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_deterministic_and_seeded(pair):
    pa, pb, data = pair
    r1 = connectivity(pa, pb, data, points=3, max_tokens=300, seed=5)
    r2 = connectivity(pa, pb, data, points=3, max_tokens=300, seed=5)
    r3 = connectivity(pa, pb, data, points=3, max_tokens=300, seed=6)
    assert r1["losses"] == r2["losses"] and r1["barrier"] == r2["barrier"]
    assert r1["losses"] != r3["losses"]  # another seed draws another sample


def test_errors_name_the_problem(pair, tmp_path):
    pa, pb, data = pair
    with pytest.raises(InputError, match="does not exist"):
        connectivity(pa, pb, tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the a"}\n{"txt": 1}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2"):
        connectivity(pa, pb, bad)
    other = T.save(T.make_model("llama", seed=0, hidden_size=48, num_attention_heads=4), tmp_path / "wide")
    with pytest.raises(PlanError, match="shape"):
        connectivity(pa, other, data)
    with pytest.raises(InputError, match="tokenizer"):
        connectivity(T.make_model("llama"), T.make_model("llama", seed=1), ["the a of"])
    with pytest.raises(InputError, match="no local directory"):
        connectivity(str(tmp_path / "missing"), pb, data)


def test_cli_connectivity_writes_report_and_plot(pair, tmp_path):
    from deltaport.cli.main import main

    pa, pb, data = pair
    before = tree_hash(pa), tree_hash(pb)
    out, png = tmp_path / "r.json", tmp_path / "c.png"
    rc = main(["connectivity", str(pa), str(pb), "--data", str(data), "--points", "3", "--max-tokens", "256",
               "-o", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["alphas"] == [0.0, 0.5, 1.0] and rep["losses"][0] == rep["loss_a"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tree_hash(pa), tree_hash(pb)) == before
    assert not [p for p in tmp_path.iterdir() if "deltaport-tmp" in p.name]
    out2 = tmp_path / "r2.json"  # a fresh path: the exit code is the missing model's, not the existing report's
    assert main(["connectivity", str(pa), str(tmp_path / "missing"), "--data", str(data), "-o", str(out2)]) == 2
    assert not out2.exists()


@pytest.fixture(scope="module")
def trained():
    """v1 (seed A, 300 steps), v1 continued (100 more steps), vx (seed B, 300 steps): a few seconds."""
    from deltaport import tinylineage as TL

    lang = TL.Language(TL.tokenizer())
    v1 = TL.pretrain(1, lang, 300, data_seed=5)
    cont = TL.pretrain(1, lang, 100, data_seed=6, model=v1)
    vx = TL.pretrain(2, lang, 300, data_seed=7)
    return lang, v1, cont, vx


def test_independent_seeds_show_a_clearly_larger_barrier_than_continued_training(trained):
    lang, v1, cont, vx = trained
    data = lang.docs(200, 1, seed=99)
    r_cont = connectivity(v1, cont, data, points=11, max_tokens=2048)
    r_seed = connectivity(v1, vx, data, points=11, max_tokens=2048)
    # the trained models are far better than uniform (ln 64 = 4.16), so the comparison means something
    assert max(r_seed["loss_a"], r_seed["loss_b"], r_cont["loss_b"]) < 0.5 * math.log(64)
    assert r_seed["barrier"] > 0.05
    assert r_seed["barrier"] > 5 * r_cont["barrier"] + 0.02


def test_bf16_models_interpolate_in_float32_with_exact_endpoints():
    a = T.make_model("llama", seed=0, dtype=torch.bfloat16)
    b = T.perturbed(a, seed=1, scale=0.05)
    ids = [[(i * 7 + j) % 60 + 3 for j in range(20)] for i in range(10)]
    r = connectivity(a, b, ids, points=3, max_tokens=150)
    assert r["dtype"] == "bfloat16"
    assert r["losses"][0] == r["loss_a"] and r["losses"][-1] == r["loss_b"]
    dst = {k: torch.empty_like(v) for k, v in a.named_parameters()}
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    interpolate_into(dst, pa, pb, 0.5)
    for k in dst:  # one rounding of the float32 midpoint
        assert torch.equal(dst[k], torch.lerp(pa[k].float(), pb[k].float(), 0.5).to(torch.bfloat16))
