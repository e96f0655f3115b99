"""The arithmetic identities, bit for bit, across architectures and dtypes; logits of loaded outputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltaport
from deltaport.testing import ARCHS
from conftest import SIGNED_ZEROS, assert_bit_equal, exact_transfer, load_sd, minus_zero_to_plus, tree_hash

DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# The families here carry −0.0 (conftest.SIGNED_ZEROS) so that every identity states what happens to the
# sign of zero. deltaport adds in IEEE 754 arithmetic: a sum whose exact value is zero is −0.0 only when
# both addends are −0.0 (t and λ·Δ), otherwise +0.0. Hence b + (f − b) and apply(diff(F, B), to=B) give
# F with each −0.0 written as +0.0 (no rule can keep it: Δ = −b for both signs of a zero f), while
# --scale 0 copies the target's bytes, −0.0 included.


def _minus_zeros(sd: dict) -> int:
    return sum(int((torch.signbit(v) & (v == 0)).sum()) for v in sd.values() if v.is_floating_point())


@pytest.mark.usefixtures("engine_chunk")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_transfer_onto_source_base_reproduces_finetuned(family, tmp_path, arch, dtype):
    p = family(arch, dtype, signed_zeros=True)
    before = {k: tree_hash(v) for k, v in p.items()}
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["source_base"], tmp_path / "out")
    ft = load_sd(p["source_finetuned"])
    assert _minus_zeros(ft) > 0
    assert_bit_equal(load_sd(tmp_path / "out"), minus_zero_to_plus(ft))  # bit for bit, −0.0 written as +0.0
    assert {k: tree_hash(v) for k, v in p.items()} == before  # inputs untouched


@pytest.mark.usefixtures("engine_chunk")
@pytest.mark.parametrize("arch", ["llama", "gemma", "phi3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_scale_zero_reproduces_target(family, tmp_path, arch, dtype):
    p = family(arch, dtype, signed_zeros=True)
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out", scale=0.0)
    assert _minus_zeros(load_sd(p["target_base"])) > 0
    assert_bit_equal(load_sd(tmp_path / "out"), load_sd(p["target_base"]))  # a byte copy: −0.0 kept


@pytest.mark.usefixtures("engine_chunk")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "olmo2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_apply_of_diff_reproduces_finetuned(family, tmp_path, arch, dtype):
    p = family(arch, dtype, signed_zeros=True)
    r = deltaport.diff(p["source_base"], p["source_finetuned"], tmp_path / "delta")
    want = torch.float64 if dtype == torch.float32 else torch.float32
    assert {t.dtype for t in load_sd(tmp_path / "delta").values()} == {want}  # the exact Δ dtype
    assert r.provenance["inexact_delta_elements"] == {}
    deltaport.apply(tmp_path / "delta", p["source_base"], tmp_path / "out")
    assert_bit_equal(load_sd(tmp_path / "out"), minus_zero_to_plus(load_sd(p["source_finetuned"])))


def _hand_built(p, scale):
    b, a, c = (load_sd(p[k]) for k in ("source_base", "source_finetuned", "target_base"))
    # the value nearest the exact t + λ·(f − b), rounded once (torch's float64 -> bf16 .to() rounds twice)
    return {k: exact_transfer(c[k], a[k], b[k], scale) for k in c}


@pytest.mark.usefixtures("engine_chunk")
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_hand_built_state_dict(family, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    p = family(arch, torch.bfloat16, signed_zeros=True)
    scale = 0.7
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out", scale=scale)
    want = _hand_built(p, scale)
    assert_bit_equal(load_sd(tmp_path / "out"), want)
    got_model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = AutoModelForCausalLM.from_pretrained(p["target_base"]).eval()
    missing, unexpected = ref.load_state_dict(want, strict=False)
    assert not unexpected
    ids = torch.tensor([[2, 5, 9, 11, 30, 7, 3]])
    with torch.no_grad():
        l1, l2 = got_model(ids).logits, ref(ids).logits
    assert torch.equal(l1, l2)
    assert not torch.equal(l1, AutoModelForCausalLM.from_pretrained(p["target_base"])(ids).logits)


@pytest.mark.usefixtures("engine_chunk")
def test_apply_equals_transfer(family, tmp_path):
    p = family("mistral", torch.bfloat16, signed_zeros=True)
    deltaport.diff(p["source_base"], p["source_finetuned"], tmp_path / "delta")
    deltaport.apply(tmp_path / "delta", p["target_base"], tmp_path / "a", scale=1.3)
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "t", scale=1.3)
    assert_bit_equal(load_sd(tmp_path / "a"), load_sd(tmp_path / "t"))


#: sign of the output where source base, fine-tune and target are all zeros (rows of SIGNED_ZEROS), by the
#: sign of λ: −0.0 (True) only where both addends t and λ·(f − b) are −0.0
_ZERO_ROWS = [i for i, row in enumerate(SIGNED_ZEROS) if None not in row]
_MINUS_ZERO_OUT = {1: {0: False, 1: False, 3: False, 5: True}, -1: {0: True, 1: False, 3: True, 5: False}}


@pytest.mark.parametrize("scale", [1.0, 0.7, -1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_sign_of_zero_follows_ieee_addition(family, tmp_path, dtype, scale):
    """T + λ·Δ where the exact result is zero: the sign IEEE 754 round-to-nearest addition gives, stated per
    case; a diff then apply writes the same bytes as the transfer."""
    p = family("qwen2", dtype, signed_zeros=True)
    assert _ZERO_ROWS == [0, 1, 3, 5]
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "t", scale=scale)
    deltaport.diff(p["source_base"], p["source_finetuned"], tmp_path / "d")
    deltaport.apply(tmp_path / "d", p["target_base"], tmp_path / "a", scale=scale)
    out = load_sd(tmp_path / "t")
    assert_bit_equal(load_sd(tmp_path / "a"), out)
    want = _MINUS_ZERO_OUT[1 if scale > 0 else -1]
    for name, t in out.items():
        head = t.reshape(-1)[:len(SIGNED_ZEROS)]
        for i in _ZERO_ROWS[: head.numel()]:
            assert head[i] == 0 and bool(torch.signbit(head[i])) == want[i], (name, i, head[i].item())


@pytest.mark.usefixtures("engine_chunk")
def test_tied_embeddings_receive_delta_once(family, tmp_path):
    """Gemma ties lm_head to embed_tokens; Δ must be added once (the official script adds it twice)."""
    from transformers import AutoModelForCausalLM

    p = family("gemma", torch.float32)
    assert "lm_head.weight" not in load_sd(p["target_base"])
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "out")
    out = load_sd(tmp_path / "out")
    assert "lm_head.weight" not in out
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    b, a, c = (load_sd(p[k])["model.embed_tokens.weight"].double() for k in ("source_base", "source_finetuned", "target_base"))
    once = (c + (a - b)).float()
    assert torch.equal(m.lm_head.weight.detach(), once)
    assert torch.equal(m.model.embed_tokens.weight.detach(), once)
    assert not torch.equal(once, (c + 2 * (a - b)).float())


def test_output_independent_of_shard_size_and_rerun_byte_identical(family, tmp_path):
    p = family("qwen2", torch.bfloat16)
    args = (p["source_base"], p["source_finetuned"], p["target_base"])
    deltaport.transfer(*args, tmp_path / "one", shard_size="1GB")
    deltaport.transfer(*args, tmp_path / "many", shard_size="3KB")
    deltaport.transfer(*args, tmp_path / "many2", shard_size="3KB")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 3
    assert (tmp_path / "many" / "model.safetensors.index.json").exists()
    assert_bit_equal(load_sd(tmp_path / "one"), load_sd(tmp_path / "many"))
    assert tree_hash(tmp_path / "many") == tree_hash(tmp_path / "many2")


def test_threads_and_chunking_do_not_change_bytes(family, tmp_path):
    p = family("llama", torch.bfloat16)
    args = (p["source_base"], p["source_finetuned"], p["target_base"])
    deltaport.transfer(*args, tmp_path / "a", threads=1, chunk_elems=1 << 20)
    deltaport.transfer(*args, tmp_path / "b", threads=2, chunk_elems=7)  # chunks split rows
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")


def test_written_files_readable_by_safetensors_library(family, tmp_path):
    from safetensors import safe_open

    p = family("phi3", torch.float16)
    deltaport.transfer(p["source_base"], p["source_finetuned"], p["target_base"], tmp_path / "o", shard_size="4KB")
    for f in (tmp_path / "o").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            assert sf.metadata()["format"] == "pt"
            for k in sf.keys():
                t = sf.get_tensor(k)
                assert t.data_ptr() % t.element_size() == 0


# bf16 values whose magnitudes span 2^-30 .. 2^15 (45 binades, the documented exactness range of
# float64 compute for bf16: the difference of two such values is exact in float64), plus zeros.
finite_bf16 = st.one_of(
    st.just(0.0), st.just(-0.0),
    st.builds(lambda s, m, e: torch.tensor(s * m * 2.0 ** e).bfloat16().item(),
              st.sampled_from([1.0, -1.0]), st.floats(1.0, 2.0, exclude_max=True), st.integers(-30, 14)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite_bf16, finite_bf16, finite_bf16), min_size=1, max_size=40))
def test_engine_identity_property(tmp_path_factory, triples):
    """Property: for arbitrary bf16 values, transfer onto the source base returns the finetuned bits with
    −0.0 written as +0.0, and λ = 0 returns the target bits exactly (a copy, −0.0 included)."""
    from safetensors.torch import save_file

    from deltaport.engine import execute
    from deltaport.io.checkpoint import open_checkpoint
    from deltaport.io.writer import OutEntry, ShardedWriter
    from deltaport.plan import make_policies, plan_transfer

    d = tmp_path_factory.mktemp("prop")
    a = torch.tensor([t[0] for t in triples], dtype=torch.bfloat16)
    b = torch.tensor([t[1] for t in triples], dtype=torch.bfloat16)
    c = torch.tensor([t[2] for t in triples], dtype=torch.bfloat16)
    for name, t in (("a", a), ("b", b), ("c", c)):
        (d / name).mkdir()
        save_file({"w": t}, str(d / name / "model.safetensors"))
    ck = {n: open_checkpoint(d / n) for n in "abc"}
    for target, scale, want in ((ck["b"], 1.0, torch.where(a == 0, torch.zeros_like(a), a)), (ck["c"], 0.0, c)):
        plan = plan_transfer(ck["b"], ck["a"], target, make_policies(scale=scale))
        out = d / f"out{scale}"
        out.mkdir()
        w = ShardedWriter(out, [OutEntry(o.name, o.out_dtype, o.shape) for o in plan.ops], 1 << 30)
        execute(plan, w)
        w.finalize()
        got = load_sd(out)["w"]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
        import shutil

        shutil.rmtree(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_transfer_rounds_once_not_twice(tmp_path, dtype):
    """T + (F − B) is rounded once to the output dtype. torch's float64 → 16-bit cast goes through
    float32 and would give 1.0 here (it lands on the midpoint first); the correct answer is one step up."""
    from safetensors.torch import save_file

    step = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11  # half a 16-bit step at 1.0
    tail = 2 ** -30 if dtype == torch.bfloat16 else 2 ** -24  # below float32's precision at 1.0, exact in dtype
    vals = {"sb": [-tail, 0.0], "sf": [step, 0.25], "tb": [1.0, 1.0]}
    for name, v in vals.items():
        (tmp_path / name).mkdir()
        save_file({"w": torch.tensor(v, dtype=dtype)}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text("{}")
    exact = torch.tensor([1.0 + step + tail, 1.25], dtype=torch.float64)
    assert exact.to(dtype)[0].item() == 1.0  # the double rounding this guards against
    deltaport.transfer(tmp_path / "sb", tmp_path / "sf", tmp_path / "tb", tmp_path / "out")
    got = load_sd(tmp_path / "out")["w"]
    assert got.tolist() == [1.0 + 2 * step, 1.25]
