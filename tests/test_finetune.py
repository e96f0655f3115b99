"""deltaport.finetune: a few SFT steps on a tiny model — loss falls, checkpoints load, assistant-only loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_sd, tree_hash
from deltaport.errors import InputError, OutputError
from deltaport.finetune import finetune, load_records
from deltaport.testing import make_model, make_tokenizer, save

DATA = Path(__file__).parent / "data" / "tiny_qa"
SFT = DATA / "sft.jsonl"
FACTS = json.loads((DATA / "facts.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(extra_words=list(FACTS))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok):
    return save(make_model("llama", seed=0), tmp_path_factory.mktemp("ft") / "base", tokenizer=tok)


class _GrabBatch:
    """A TrainerCallback that keeps the first training batch (what the loss is computed on)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Grab(TrainerCallback):
            batch = None

            def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
                Grab.batch = next(iter(train_dataloader))

        return Grab()


def _trained_tokens(batch, tok) -> list[list[str]]:
    out = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        assert torch.equal(labels[labels != -100], ids[labels != -100])  # labels are the inputs, unshifted
        out.append(tok.convert_ids_to_tokens(ids[labels != -100].tolist()))
    return out


def test_loss_falls_checkpoint_loads_inputs_unchanged(base_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    before = tree_hash(base_dir), tree_hash(DATA)
    r = finetune(str(base_dir), str(SFT), tmp_path / "ft", steps=12, lr=3e-3, batch_size=4, save_every=6)
    assert (tree_hash(base_dir), tree_hash(DATA)) == before
    losses = [e["loss"] for e in r.log]
    assert len(losses) == 12 and all(e["step"] == i + 1 for i, e in enumerate(r.log))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert r.log[-1]["tokens"] > r.log[0]["tokens"] > 0 and r.log[0]["lr"] is not None
    out = Path(r.output)
    assert json.loads((out / "train_log.json").read_text()) == r.log
    prov = json.loads((out / "deltaport.json").read_text())
    assert prov["settings"]["steps"] == 12 and prov["data"]["sha256"] and prov["settings"]["loss"].startswith(
        "assistant_only")
    ck = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-6").eval()
    final = AutoModelForCausalLM.from_pretrained(out).eval()
    base_sd, ck_sd, final_sd = load_sd(base_dir), load_sd(out / "checkpoints" / "step-6"), load_sd(out)
    assert sorted(ck_sd) == sorted(base_sd) == sorted(final_sd)
    assert not torch.equal(ck_sd["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"])
    assert not torch.equal(ck_sd["model.embed_tokens.weight"], final_sd["model.embed_tokens.weight"])
    ids = torch.tensor([[4, 11, 12, 10]])
    with torch.no_grad():  # the saved model is the in-memory result
        assert torch.allclose(final(ids).logits, r.model(ids).logits, atol=1e-6)
        assert ck(ids).logits.isfinite().all()
    with pytest.raises(OutputError, match="already exists"):
        finetune(str(base_dir), str(SFT), out, steps=1)


def test_only_assistant_tokens_carry_loss(base_dir, tok, tmp_path):
    grab = _GrabBatch()
    finetune(str(base_dir), str(SFT), None, steps=1, batch_size=4, callbacks=[grab])
    answers = set(FACTS.values())
    for toks in _trained_tokens(grab.batch, tok):
        assert len(toks) == 2 and toks[0] in answers and toks[1] == "<|end|>", toks


def test_template_without_generation_markers_and_prompt_completion(tok, tmp_path):
    plain_tmpl = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|> "
                  "{% else %}<|assistant|> {{ m['content'] }} <|end|> {% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    model = make_model("llama", seed=1)
    grab = _GrabBatch()
    chats = [{"messages": [{"role": "user", "content": "what color is the flag of alpha ?"},
                           {"role": "assistant", "content": "red"},
                           {"role": "user", "content": "and of bravo ?"},
                           {"role": "assistant", "content": "blue"}]}] * 4
    finetune((model, tok), chats, None, steps=1, batch_size=4, chat_template=plain_tmpl, callbacks=[grab])
    for toks in _trained_tokens(grab.batch, tok):  # only the LAST assistant turn is a completion
        assert toks == ["blue", "<|end|>"], toks
    grab = _GrabBatch()
    pairs = [{"prompt": "Q : what color is the flag of alpha ? A :", "completion": " green"}] * 4
    r = finetune((model, tok), pairs, None, steps=1, batch_size=4, callbacks=[grab])
    for toks in _trained_tokens(grab.batch, tok):
        assert toks[0] == "green" and set(toks[1:]) <= {"</s>"}, toks
    assert r.provenance["settings"]["loss"].startswith("completion_only")
    for p in model.parameters():  # the caller's in-memory model is not modified
        assert not p.requires_grad or p.grad is None


def test_lora_and_eval_every(base_dir, tok, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = []
    r = finetune(str(base_dir), str(SFT), tmp_path / "lora", steps=4, lr=1e-2, batch_size=4, lora=True, lora_r=4,
                 eval_every=2, eval_tasks=[str(DATA / "tiny_qa.yaml")], eval_limit=4, save_every=2,
                 callbacks=[lambda step, m: seen.append(step)])
    assert [e["step"] for e in r.evals] == [0, 2, 4] and seen == [0, 2, 4]
    assert set(r.evals[0]["results"]["tiny_qa"]) >= {"acc", "acc_stderr"}
    out = Path(r.output)
    assert json.loads((out / "evals.json").read_text()) == r.evals
    merged, base = load_sd(out), load_sd(base_dir)
    assert sorted(merged) == sorted(base)  # a plain model (adapter merged), not an adapter
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)  # LoRA touches linear layers only
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    ids = torch.tensor([[4, 11, 12, 10, 7]])
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, AutoModelForCausalLM.from_pretrained(out)(ids).logits, atol=1e-5)
    assert (out / "checkpoints" / "step-2" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(base_dir, tmp_path):
    from transformers import TrainerCallback

    kw = dict(steps=6, lr=3e-3, batch_size=4, save_every=3, eval_every=2, eval_tasks=[str(DATA / "tiny_qa.yaml")],
              eval_limit=4)
    ref = finetune(str(base_dir), str(SFT), tmp_path / "ref", **kw)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if state.global_step == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(str(base_dir), str(SFT), tmp_path / "out", resume=True, callbacks=[Kill()], **kw)
    work = tmp_path / ".out.deltaport-work"
    assert not (tmp_path / "out").exists() and (work / "trainer" / "checkpoint-3").is_dir()
    r = finetune(str(base_dir), str(SFT), tmp_path / "out", resume=True, **kw)
    assert r.provenance["resumed_from_step"] == 3 and not work.exists()
    assert [e["loss"] for e in r.log] == [e["loss"] for e in ref.log] and r.evals == ref.evals
    a, b = load_sd(tmp_path / "ref"), load_sd(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "checkpoints" / "step-3" / "config.json").is_file()
    with pytest.raises(InputError, match="needs save_every"):
        finetune(str(base_dir), str(SFT), tmp_path / "x", resume=True, steps=2)


def test_dataset_folder_goes_through_load_dataset(tmp_path):
    """A local dataset folder takes the same `datasets.load_dataset` path as a hub dataset name."""
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text(SFT.read_text())
    recs, info = load_records(str(d))
    assert info["kind"] == "hub" and info["format"] == "messages" and info["n"] == len(FACTS)
    assert recs[0] == json.loads(SFT.read_text().splitlines()[0])
    with pytest.raises(InputError, match="cannot load hub dataset 'nobody/nothing'"):
        load_records("nobody/nothing")


def test_bad_data_is_reported_with_location(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    with pytest.raises(InputError, match=r"d\.jsonl:2: not valid JSON"):
        load_records(str(p))
    p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(InputError, match="record 1: the chat has no assistant turn"):
        load_records(str(p))
    with pytest.raises(InputError, match="mixes chat records and prompt/completion"):
        load_records([{"prompt": "a", "completion": "b"},
                      {"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(InputError, match="data file .*missing.jsonl not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="unknown recipe"):
        finetune("x", [{"prompt": "a", "completion": "b"}], None, recipe="fast")
    with pytest.raises(InputError, match="eval_every needs"):
        finetune("x", [{"prompt": "a", "completion": "b"}], None, eval_every=2)


def test_paper_recipe_settings():
    from deltaport.finetune import RECIPES

    p = RECIPES["paper"]
    assert (p.lr, p.scheduler, p.warmup_ratio, p.weight_decay, p.batch_size, p.steps, p.save_every) == (
        5e-6, "linear", 0.03, 0.0, 8, 30000, 5000)


def test_cli_finetune(base_dir, tmp_path):
    from deltaport.cli.main import main

    out = tmp_path / "cli_ft"
    args = ["finetune", "--model", str(base_dir), "--data", str(SFT), "-o", str(out), "--steps", "2",
            "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert (out / "config.json").is_file() and len(json.loads((out / "train_log.json").read_text())) == 2
    assert main(args) == 2  # exists, no --overwrite
    assert main(["finetune", "--model", str(base_dir), "--data", str(tmp_path / "nope.jsonl"), "-o",
                 str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("recipe,lr_at_2", [("quick", 1e-4 / 3), ("paper", 5e-6 / 900)])
def test_warmup_is_a_ratio_of_the_steps(base_dir, recipe, lr_at_2):
    """The recipes' 3 % warm-up: ceil(0.03 × steps) warm-up steps (quick: 3 of 100, paper: 900 of 30000).
    The learning rate the scheduler gives optimizer step 1 is 0 (linear warm-up starts at zero), step 2
    gets lr / warm-up steps. transformers < 5 read the float ``warmup_steps=0.03`` as 0.03 *steps*
    (no warm-up: step 2 would get ~0.99·lr); hence transformers >= 5."""
    from transformers import TrainerCallback

    used = []

    class StopAfterTwo(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            used.append(optimizer.param_groups[0]["lr"])  # what this optimizer step uses

        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 2

    r = finetune(str(base_dir), str(SFT), None, recipe=recipe, batch_size=4, callbacks=[StopAfterTwo()])
    assert used[0] == 0.0
    assert used[1] == pytest.approx(lr_at_2, rel=1e-6)
    if recipe == "quick":  # logged every step
        assert [e["lr"] for e in r.log] == used
