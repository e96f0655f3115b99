"""``apply D1 D2 ... --to T``: out = T + Σ λ_i·Δ_i, each element the nearest value of the exact sum."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

import deltaport
from deltaport import testing as T
from deltaport.cli.main import main
from deltaport.numerics import round_fraction
from conftest import assert_bit_equal, bits, load_sd


def _reference(target: dict, deltas: list[dict], lams: list[float]) -> dict:
    """Exact rationals: round(t + Σ λ_i·Δ_i) per element (Δ_i = 0 where a delta lacks the tensor)."""
    out = {}
    for k, t in target.items():
        flat = t.reshape(-1).tolist()
        ds = [d[k].reshape(-1).double().tolist() if k in d else None for d in deltas]
        vals = []
        for j, tv in enumerate(flat):
            x = Fraction(tv)
            for lam, d in zip(lams, ds):
                if d is not None:
                    x += Fraction(lam) * Fraction(d[j])
            vals.append(round_fraction(x, t.dtype))
        out[k] = torch.tensor(vals, dtype=torch.float64).to(t.dtype).view(t.shape)
    return out


@pytest.fixture(scope="module")
def two(family, tmp_path_factory):
    """Two deltas on one base: fine-tunes with different seeds."""
    p = family("llama", torch.bfloat16)
    root = tmp_path_factory.mktemp("compose")
    base = T.make_model("llama", seed=0, dtype=torch.bfloat16)
    T.save(T.perturbed(base, seed=7, scale=2e-3), root / "ft2")
    deltaport.diff(p["source_base"], p["source_finetuned"], root / "d1")
    deltaport.diff(p["source_base"], root / "ft2", root / "d2")
    return {**p, "d1": root / "d1", "d2": root / "d2", "root": root}


@pytest.mark.parametrize("lams", [(0.7, 0.3), (1.0, -0.45), (1.3, 0.1)])
def test_two_deltas_equal_exact_rational_sum(two, tmp_path, lams):
    deltaport.apply([two["d1"], two["d2"]], two["target_base"], tmp_path / "o", scale=list(lams))
    want = _reference(load_sd(two["target_base"]), [load_sd(two["d1"]), load_sd(two["d2"])], list(lams))
    assert_bit_equal(load_sd(tmp_path / "o"), want)


def test_float64_sum_off_by_a_tie_is_corrected(tmp_path):
    """t = 1, Δ1 = 2⁻²⁴ (half a float32 step at 1), Δ2 = 2⁻⁶⁰: the float64 sum drops Δ2 and lands on the tie
    (→ 1.0 by round-to-even); the exact sum is past it, so the nearest float32 is 1 + 2⁻²³."""
    base = T.make_model("llama", seed=0, dtype=torch.float32)
    models = {n: T.perturbed(base, seed=i, scale=0.0) for i, n in enumerate(("t", "b1", "f1", "b2", "f2"))}
    w = "model.layers.0.self_attn.q_proj.weight"
    for n, v in (("t", 1.0), ("b1", 2.0 ** -24), ("f1", 2.0 ** -23), ("b2", 2.0 ** -59), ("f2", 1.5 * 2.0 ** -59)):
        models[n].get_parameter(w).data.view(-1)[0] = v
    for n, m in models.items():
        T.save(m, tmp_path / n)
    deltaport.diff(tmp_path / "b1", tmp_path / "f1", tmp_path / "d1")
    deltaport.diff(tmp_path / "b2", tmp_path / "f2", tmp_path / "d2")
    res = deltaport.apply([tmp_path / "d1", tmp_path / "d2"], tmp_path / "t", tmp_path / "o")
    assert float(load_sd(tmp_path / "o")[w].view(-1)[0]) == 1.0 + 2.0 ** -23
    assert res.stats.exact_fixups >= 1
    one = float(torch.tensor(1.0, dtype=torch.float64) + 2.0 ** -24 + 2.0 ** -60)
    assert float(torch.tensor(one).to(torch.float32)) == 1.0  # what a plain float64 evaluation would write


def test_compressed_and_exact_deltas_compose(two, tmp_path):
    """A low-rank delta composes with an exact one; its Δ is the dense D it means (decompress)."""
    from deltaport.compression import decompress

    deltaport.compress(two["d2"], tmp_path / "c2", method="lowrank", rank=2)
    decompress(tmp_path / "c2", tmp_path / "c2dense")
    deltaport.apply([two["d1"], tmp_path / "c2"], two["target_base"], tmp_path / "o", scale=[0.7, 0.6])
    want = _reference(load_sd(two["target_base"]), [load_sd(two["d1"]), load_sd(tmp_path / "c2dense")], [0.7, 0.6])
    assert_bit_equal(load_sd(tmp_path / "o"), want)


def test_scale_map_multiplies_each_lambda(two, tmp_path):
    sm = tmp_path / "sm.yaml"
    sm.write_text("'mlp': 2.0\n")
    deltaport.apply([two["d1"], two["d2"]], two["target_base"], tmp_path / "a", scale=[0.5, 0.25], scale_map=str(sm))
    a = load_sd(tmp_path / "a")
    want = _reference(load_sd(two["target_base"]), [load_sd(two["d1"]), load_sd(two["d2"])], [1.0, 0.5])
    want_attn = _reference(load_sd(two["target_base"]), [load_sd(two["d1"]), load_sd(two["d2"])], [0.5, 0.25])
    for k in a:
        assert torch.equal(bits(a[k]), bits((want if "mlp" in k else want_attn)[k])), k


def test_one_scale_per_delta_cli(two, tmp_path, capsys):
    args = ["apply", str(two["d1"]), str(two["d2"]), "--to", str(two["target_base"]), "-o", str(tmp_path / "o")]
    assert main(args + ["--scale", "0.5"]) == 2
    assert "2 deltas but 1 --scale values" in capsys.readouterr().err
    assert main(args + ["--scale", "0.5", "--scale", "0.25"]) == 0
    want = _reference(load_sd(two["target_base"]), [load_sd(two["d1"]), load_sd(two["d2"])], [0.5, 0.25])
    assert_bit_equal(load_sd(tmp_path / "o"), want)


def _no_reads(monkeypatch):
    import deltaport.engine as E
    from deltaport.io import reader
    from deltaport.io.checkpoint import Checkpoint

    def boom(*a, **k):
        raise AssertionError("a tensor byte was read")

    monkeypatch.setattr(reader, "pread_into", boom)
    monkeypatch.setattr(Checkpoint, "tensor", boom)
    monkeypatch.setattr(E.Engine, "run", boom)


def test_conflicting_structures_refused_before_any_read(two, family, tmp_path, capsys, monkeypatch):
    q = family("qwen2", torch.bfloat16)
    deltaport.diff(q["source_base"], q["source_finetuned"], tmp_path / "dq")
    _no_reads(monkeypatch)
    rc = main(["apply", str(two["d1"]), str(tmp_path / "dq"), "--to", str(two["target_base"]), "-o", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot compose the 2 deltas" in err and str(tmp_path / "dq") in err
    assert not (tmp_path / "o").exists()


def test_conflicting_vocabularies_refused_before_any_read(two, tmp_path, capsys, monkeypatch):
    base = T.make_model("llama", seed=0, dtype=torch.bfloat16)
    T.save(T.perturbed(base, seed=9, scale=1e-3), tmp_path / "ft3", tokenizer=T.make_tokenizer(["orange", "purple"]))
    deltaport.diff(two["source_base"], tmp_path / "ft3", tmp_path / "d3")
    _no_reads(monkeypatch)
    rc = main(["apply", str(two["d1"]), str(tmp_path / "d3"), "--to", str(two["target_base"]), "-o", str(tmp_path / "o")])
    assert rc == 2
    assert "vocabulary differs" in capsys.readouterr().err


def test_same_delta_twice_refused(two, tmp_path, capsys):
    rc = main(["apply", str(two["d1"]), str(two["d1"]), "--to", str(two["target_base"]), "-o", str(tmp_path / "o")])
    assert rc == 2 and "given twice" in capsys.readouterr().err


def test_round_fraction_matches_float_rounding():
    for v in (1.0 + 2.0 ** -8, 1.0 + 2.0 ** -9, -3.140625, 0.0009765625 * 1.1875, 6.5e4, 2.0 ** -130, 1.5 * 2.0 ** 127):
        for dt in (torch.bfloat16, torch.float16, torch.float32):  # v is a float32: one rounding float32 -> dt
            assert round_fraction(Fraction(v), dt) == float(torch.tensor(v, dtype=torch.float32).to(dt)), (v, dt)
    x = Fraction(1) + Fraction(1, 2 ** 8) + Fraction(1, 2 ** 60)  # just past a bf16 tie
    assert round_fraction(x, torch.bfloat16) == 1.0078125


def test_nonfinite_target_values_pass_through_a_composed_apply(two, tmp_path):
    """A NaN in the target is carried (and reported), never sent to the exact-rational path (where Fraction
    would raise). An Inf is left out: the shared 16-bit rounding turns it into NaN (numerics.jam_to_float32)."""
    m = T.make_model("llama", seed=0, dtype=torch.bfloat16)
    w = "model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():
        m.get_parameter(w).view(-1)[:1] = float("nan")
    T.save(m, tmp_path / "t")
    res = deltaport.apply([two["d1"], two["d2"]], tmp_path / "t", tmp_path / "o", scale=[0.5, 0.5])
    got = load_sd(tmp_path / "o")[w].view(-1)
    assert got[0].isnan() and torch.isfinite(got[1:]).all()
    assert w in res.stats.nonfinite_inputs


def _ties_reference(target: dict, deltas: list[dict], lams: list[float], density: float) -> dict:
    """TIES (Yadav et al. 2023) in exact rationals: trim each Δ_i to its ⌈density·N⌉ largest |entries| (ties at the
    threshold kept), c_i = λ_i·trim(Δ_i), elect sign(Σ c_i), average the c_i of that sign; round t + mean once."""
    import math

    out = {}
    for k, t in target.items():
        ds = [d[k].reshape(-1).double() for d in deltas]
        thr = []
        for d in ds:
            kk = max(1, math.ceil(density * d.numel()))
            thr.append(float(d.abs().sort(descending=True).values[kk - 1]) if kk < d.numel() else 0.0)
        vals = []
        for j, tv in enumerate(t.reshape(-1).tolist()):
            cs = [Fraction(lam) * Fraction(float(d[j])) if abs(float(d[j])) >= th else Fraction(0)
                  for lam, d, th in zip(lams, ds, thr)]
            total = sum(cs, Fraction(0))
            agree = [c for c in cs if c != 0 and total != 0 and (c > 0) == (total > 0)]
            vals.append(round_fraction(Fraction(tv) + sum(agree, Fraction(0)) / max(len(agree), 1), t.dtype))
        out[k] = torch.tensor(vals, dtype=torch.float64).to(t.dtype).view(t.shape)
    return out


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_ties_sign_consensus_equals_exact_reference(two, tmp_path, density):
    d3 = tmp_path / "d3"
    base = T.make_model("llama", seed=0, dtype=torch.bfloat16)
    T.save(T.perturbed(base, seed=11, scale=1.5e-3), tmp_path / "ft3")
    deltaport.diff(two["source_base"], tmp_path / "ft3", d3)
    lams = [0.9, 0.6, 1.1]
    deltaport.apply([two["d1"], two["d2"], d3], two["target_base"], tmp_path / "o", scale=lams, ties=density)
    want = _ties_reference(load_sd(two["target_base"]), [load_sd(two["d1"]), load_sd(two["d2"]), load_sd(d3)], lams,
                           density)
    got = load_sd(tmp_path / "o")
    assert_bit_equal(got, want)
    plain = _reference(load_sd(two["target_base"]), [load_sd(two["d1"]), load_sd(two["d2"]), load_sd(d3)], lams)
    assert any(not torch.equal(bits(got[k]), bits(plain[k])) for k in got)  # TIES is not the plain sum


def test_ties_needs_several_deltas_and_a_density(two, tmp_path, capsys):
    assert main(["apply", str(two["d1"]), "--to", str(two["target_base"]), "-o", str(tmp_path / "o"), "--ties", "0.2"]) == 2
    assert "two or more delta" in capsys.readouterr().err
    assert main(["apply", str(two["d1"]), str(two["d2"]), "--to", str(two["target_base"]), "-o", str(tmp_path / "o"),
                 "--ties", "0"]) == 2
    assert "--ties must be" in capsys.readouterr().err
