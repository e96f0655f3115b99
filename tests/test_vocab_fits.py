"""Never a model that cannot run its own tokenizer: every vocabulary policy × tokenizer choice either
writes an output whose every token id has an embedding row (and an lm_head row: these tiny models are
untied), with ``vocab_size`` equal to its rows and a forward pass over every id, or exits 2 before
anything is written. The fine-tune added three tokens (ids 31-33); the target is a new release without
them. Rows are compared with a row-by-row reference written here."""

from __future__ import annotations

import json

import pytest
import torch

import deltaport
from deltaport import testing as T
from conftest import bits, exact_transfer, load_sd, tree_hash

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
ADDED = ["<think>", "<tool>", "<fin>"]
POLICIES = ("error", "pad", "align")
TOKENIZERS = ("target", "source-finetuned")


def _tok(added=()):
    tok = T.make_tokenizer()
    if added:
        tok.add_tokens(list(added))
    return tok


def _with_rows(model, rows: int, seed: int):
    """``model`` resized to ``rows`` rows, the new rows random (a fine-tune that trained its added tokens)."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in (model.model.embed_tokens.weight, model.lm_head.weight):
            w[old:] = torch.randn(rows - old, w.shape[1], generator=g).to(w.dtype)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """sb, tb: the 31-token vocabulary with 31 rows; sf: adds <think> <tool> <fin> (ids 31-33) with 34
    rows; sf_broken: a fine-tune whose tokenizer gained the tokens but whose embedding was never resized."""
    root = tmp_path_factory.mktemp("vocabfits")
    base = T.make_model("llama", seed=0, vocab_size=31)
    ft = _with_rows(T.perturbed(base, seed=1, scale=1e-2), 34, seed=11).to(torch.bfloat16)
    tgt = T.perturbed(base, seed=2, scale=5e-2).to(torch.bfloat16)
    broken = T.perturbed(base, seed=3, scale=1e-2).to(torch.bfloat16)
    base = base.to(torch.bfloat16)
    return {"sb": T.save(base, root / "sb", tokenizer=_tok()), "tb": T.save(tgt, root / "tb", tokenizer=_tok()),
            "sf": T.save(ft, root / "sf", tokenizer=_tok(ADDED)),
            "sf_broken": T.save(broken, root / "sf_broken", tokenizer=_tok(ADDED))}


def _runs_its_tokenizer(out) -> int:
    """Assert the output loads, its config's vocab_size is its rows and every token id runs; its rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    rows = model.get_input_embeddings().weight.shape[0]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows == model.lm_head.weight.shape[0]
    ids = sorted(tok.get_vocab().values())
    assert ids[-1] < rows
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), rows) and torch.isfinite(logits).all()
    return rows


def _expected_rows(models, policy: str, tokenizer: str, scale: float) -> dict[str, torch.Tensor]:
    """Row by row: tokens 0-30 are shared by all three models (t + λ·(f − b)); the added tokens 31-33 are
    new to the target and the base: λ·f (zero target and base rows), under pad and under align with the
    fine-tune's tokenizer; align with the target's tokenizer leaves them out."""
    a, b, c = (load_sd(models[k]) for k in ("sf", "sb", "tb"))
    want = {}
    for k in (EMB, HEAD):
        rows = [exact_transfer(c[k][j], a[k][j], b[k][j], scale) for j in range(31)]
        if policy == "pad" or tokenizer == "source-finetuned":
            zero = torch.zeros_like(a[k][0])
            rows += [exact_transfer(zero, a[k][j], zero, scale) for j in range(31, 34)]
        want[k] = torch.stack(rows)
    return want


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_every_policy_and_tokenizer_writes_a_model_that_runs_its_tokenizer_or_exits_2(models, tmp_path, policy,
                                                                                      tokenizer):
    out = tmp_path / "o"
    kw = dict(vocab_policy=policy, tokenizer_from=tokenizer, scale=0.7)
    if policy == "error":  # 34 vs 31 rows: refused by the policy itself, before anything is written
        with pytest.raises(deltaport.InputError, match="vocabulary sizes differ"):
            deltaport.transfer(models["sb"], models["sf"], models["tb"], out, **kw)
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    r = deltaport.transfer(models["sb"], models["sf"], models["tb"], out, **kw)
    rows = _runs_its_tokenizer(out)
    assert rows == (31 if (policy, tokenizer) == ("align", "target") else 34)
    got, want = load_sd(out), _expected_rows(models, policy, tokenizer, 0.7)
    for k in (EMB, HEAD):
        assert torch.equal(bits(got[k]), bits(want[k])), k
    prov = json.loads((out / "deltaport.json").read_text())
    rec = prov["output_tokenizer"]
    assert rec["checked"] and rec["max_id"] == (33 if tokenizer == "source-finetuned" else 30)
    assert rec["rows"] == {EMB: rows, HEAD: rows}
    dropped = rec.get("finetuned_tokens_dropped")
    if tokenizer == "target":  # the fine-tune's added tokens are named, in provenance and in the summary
        assert dropped == {"count": 3, "first": [{"token": t, "finetuned_id": 31 + i} for i, t in enumerate(ADDED)]}
        assert any('lacks 3 token(s) of the source fine-tune\'s tokenizer' in w and '"<think>", "<tool>", "<fin>"' in w
                   for w in r.plan.warnings), r.plan.warnings
    else:
        assert dropped is None  # the output's tokenizer is the fine-tune's
    if policy == "align" and tokenizer == "source-finetuned":
        va = prov["vocab_align"]
        assert va["output_tokenizer"] == "source-finetuned" and va["output_rows"] == 34
        assert va["tokens_new_to_target"] == {"count": 3, "first": [{"token": t, "output_id": 31 + i}
                                                                    for i, t in enumerate(ADDED)]}


def test_align_with_the_finetunes_tokenizer_gives_the_rows_pad_gives(models, tmp_path):
    """Same vocabulary order, so align (by token string) and pad (by index) must agree bit for bit,
    λ < 0 and λ = 0 included (at λ = 0 a new row is λ·f = 0)."""
    for scale in (-0.5, 0.0, 1.0):
        for policy in ("pad", "align"):
            deltaport.transfer(models["sb"], models["sf"], models["tb"], tmp_path / f"{policy}{scale}", scale=scale,
                               vocab_policy=policy, tokenizer_from="source-finetuned", chunk_elems=64 if scale else None)
        pad, align = load_sd(tmp_path / f"pad{scale}"), load_sd(tmp_path / f"align{scale}")
        for k in pad:
            assert torch.equal(bits(pad[k]), bits(align[k])), (scale, k)
    assert torch.equal(bits(load_sd(tmp_path / "align1.0")[EMB][31:]), bits(load_sd(models["sf"])[EMB][31:]))


@pytest.mark.parametrize("policy", POLICIES)
def test_a_tokenizer_past_the_embedding_is_refused_before_writing(models, tmp_path, policy):
    """The broken fine-tune's tokenizer has ids 31-33 but 31 rows: with its tokenizer, no policy can give
    those ids rows, so every one exits 2 before writing (the dry run too); with the target's it works."""
    out = tmp_path / "o"
    for dry_run in (True, False):
        with pytest.raises(deltaport.InputError, match=r"(past row 31|neither in the target)") as exc:
            deltaport.transfer(models["sb"], models["sf_broken"], models["tb"], out, vocab_policy=policy,
                               tokenizer_from="source-finetuned", dry_run=dry_run)
        assert not out.exists() and list(tmp_path.iterdir()) == []
    if policy != "align":
        assert f"{EMB} has 31 rows" in str(exc.value) and '"<think>" (id 31)' in str(exc.value)
        assert "--tokenizer-from target" in str(exc.value)
    deltaport.transfer(models["sb"], models["sf_broken"], models["tb"], out, vocab_policy=policy)
    assert _runs_its_tokenizer(out) == 31


def test_cli_exits_2_with_the_tokens_and_the_fix_and_no_traceback(models, tmp_path):
    from hostile_cases import in_process_runner

    before = {k: tree_hash(models[k]) for k in ("sb", "sf_broken", "tb")}
    argv = ["transfer", "--source-base", str(models["sb"]), "--source-finetuned", str(models["sf_broken"]),
            "--target-base", str(models["tb"]), "--tokenizer-from", "source-finetuned", "-o", str(tmp_path / "o")]
    rc, _, err = in_process_runner(argv)
    assert rc == 2, err
    assert "Traceback" not in err and "has 31 rows" in err and '"<fin>" (id 33)' in err, err
    assert not (tmp_path / "o").exists() and {k: tree_hash(models[k]) for k in before} == before
    # the summary names the fine-tune's tokens the output's tokenizer drops
    rc, _, err = in_process_runner(["transfer", "--source-base", str(models["sb"]), "--source-finetuned", str(models["sf"]),
                                    "--target-base", str(models["tb"]), "--vocab-policy", "align", "-o", str(tmp_path / "a")])
    assert rc == 0 and 'lacks 3 token(s)' in err and '"<think>", "<tool>", "<fin>"' in err, err


def test_apply_with_the_finetunes_tokenizer_fits_or_exits_2(models, tmp_path):
    """apply's --tokenizer-from source-finetuned (the delta's copy of the fine-tune's tokenizer): pad gives
    the added ids rows; a delta of the broken fine-tune is refused before writing."""
    deltaport.diff(models["sb"], models["sf"], tmp_path / "d", vocab_policy="pad")
    deltaport.apply(tmp_path / "d", models["tb"], tmp_path / "o", vocab_policy="pad", tokenizer_from="source-finetuned")
    assert _runs_its_tokenizer(tmp_path / "o") == 34
    deltaport.transfer(models["sb"], models["sf"], models["tb"], tmp_path / "t", vocab_policy="pad",
                       tokenizer_from="source-finetuned")
    got, want = load_sd(tmp_path / "o"), load_sd(tmp_path / "t")
    assert all(torch.equal(bits(got[k]), bits(want[k])) for k in want)
    deltaport.diff(models["sb"], models["sf_broken"], tmp_path / "db")
    with pytest.raises(deltaport.InputError, match="past row 31"):
        deltaport.apply(tmp_path / "db", models["tb"], tmp_path / "ob", tokenizer_from="source-finetuned")
    assert not (tmp_path / "ob").exists()


def test_the_written_output_is_checked_again_before_it_is_published(models, tmp_path, monkeypatch):
    """Were the check after planning missed, the one on the written files refuses to publish it."""
    import deltaport.api as api

    monkeypatch.setattr(api, "_check_vocab", lambda *a, **k: None)
    out = tmp_path / "o"
    with pytest.raises(deltaport.InputError, match="found in the written output, which was not published"):
        deltaport.transfer(models["sb"], models["sf_broken"], models["tb"], out, tokenizer_from="source-finetuned")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_unreadable_tokenizer_is_reported_not_guessed(models, tmp_path):
    """A tokenizer.json that is not JSON: the fine-tune's (not the output's) costs only the names of its
    dropped tokens; the output's own is copied as given, with a warning that it could not be checked."""
    import shutil

    sf = tmp_path / "sf"
    shutil.copytree(models["sf"], sf)
    (sf / "tokenizer.json").write_text("{not json")
    r = deltaport.transfer(models["sb"], sf, models["tb"], tmp_path / "o", vocab_policy="pad")
    rec = r.provenance["output_tokenizer"]
    assert rec["checked"] and "finetuned_tokens_dropped" not in rec
    r = deltaport.transfer(models["sb"], sf, models["tb"], tmp_path / "o2", vocab_policy="pad",
                           tokenizer_from="source-finetuned")
    rec = r.provenance["output_tokenizer"]
    assert not rec["checked"] and "not valid JSON" in rec["reason"]
    assert any(w.startswith("could not check that every id of the output's tokenizer") for w in r.plan.warnings)
