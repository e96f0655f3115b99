"""Fine-tuning and evaluation in several processes: two CPU processes over gloo, launched by torchrun
and by accelerate (configs/accelerate_cpu_ddp.yaml, configs/accelerate_cpu_fsdp.yaml), on the tiny Llama,
compared with one process run with the same flags. Every launch is a real subprocess tree, as a user
starts it (the launchers' ``python -m`` entry points, so the interpreter is this one).

Slow by nature (each launch starts two Python processes that import torch, transformers and TRL).
``DELTAPORT_TEST_DEVICE=cuda`` (scripts/gpu_check.sh) runs the same tests on GPUs: one process per GPU,
the configs with ``use_cpu: false``; the multi-process tests need two GPUs and skip otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltaport
from conftest import load_sd, tree_hash
from deltaport.testing import make_model, make_tokenizer, save

DEVICE = os.environ.get("DELTAPORT_TEST_DEVICE", "cpu")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.device_count() < 2,
                                 reason="two processes on GPUs need two GPUs")]

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "tiny_qa"
SFT = DATA / "sft.jsonl"
TASK = DATA / "tiny_qa.yaml"
DDP_CFG = ROOT / "configs" / "accelerate_cpu_ddp.yaml"
FSDP_CFG = ROOT / "configs" / "accelerate_cpu_fsdp.yaml"
FLAGS = ["--data", str(SFT), "--recipe", "quick", "--steps", "8", "--batch-size", "8", "--micro-batch-size", "2",
         "--seed", "0", "--device", DEVICE, "--no-progress"]
PICKLES = ("*.bin", "*.pt", "*.pkl", "*.pickle", "*.pth")


def config(cfg: Path, tmp: Path) -> Path:
    """The shipped CPU config, or on GPUs the same with ``use_cpu: false`` (one process per GPU, NCCL)."""
    if DEVICE == "cpu":
        return cfg
    gpu = tmp / f"gpu_{cfg.name}"
    gpu.write_text(cfg.read_text().replace("use_cpu: true", "use_cpu: false"))
    return gpu


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` with this checkout's deltaport (and the tests' driver) importable, one thread each."""
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    paths = [str(Path(deltaport.__file__).parents[1]), str(Path(__file__).parent)]
    e["PYTHONPATH"] = os.pathsep.join(paths + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=1200)


def torchrun(args: list[str], cwd: Path, module: str = "deltaport.cli.main", **env) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(),
                 "-m", module, *args], cwd, **env)


def accelerate(cfg: Path | None, args: list[str], cwd: Path, module: str = "deltaport.cli.main", launch=(),
               **env) -> subprocess.CompletedProcess:
    how = ["--config_file", str(cfg)] if cfg else []
    return _run([sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2",
                 "--main_process_port", _port(), *launch, "-m", module, *args], cwd, **env)


def alone(args: list[str], cwd: Path, module: str = "deltaport.cli.main", **env) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", module, *args], cwd, **env)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def wrote_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in (p.stdout + p.stderr).splitlines() if "wrote " in ln]


def settings(out: Path) -> dict:
    return json.loads((out / "deltaport.json").read_text())["settings"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def no_pickles(out: Path) -> list[Path]:
    return [p for pat in PICKLES for p in out.rglob(pat)]


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist")
    facts = json.loads((DATA / "facts.json").read_text())
    save(make_model("llama", seed=0), d / "base", tokenizer=make_tokenizer(extra_words=list(facts)))
    return d


@pytest.fixture(scope="module")
def one_process(space) -> Path:
    """The reference: one process, the same flags."""
    ok(alone(["finetune", "--model", str(space / "base"), "-o", str(space / "one"), *FLAGS], space))
    return space / "one"


@pytest.fixture(scope="module")
def torchrun_run(space) -> tuple[Path, subprocess.CompletedProcess, dict]:
    before = tree_hash(space / "base")
    (space / "tr").mkdir()
    p = ok(torchrun(["finetune", "--model", str(space / "base"), "-o", str(space / "tr" / "ft"), *FLAGS], space))
    assert tree_hash(space / "base") == before  # inputs unchanged
    return space / "tr" / "ft", p, before


def test_torchrun_two_processes_match_one(one_process, torchrun_run):
    out, p, _ = torchrun_run
    s1, s2 = settings(one_process), settings(out)
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert (s1["gradient_accumulation_steps"], s2["gradient_accumulation_steps"]) == (4, 2)  # 8 = 2 × 2 × 2
    assert max_abs_diff(load_sd(one_process), load_sd(out)) <= 1e-5
    l1 = json.loads((one_process / "train_log.json").read_text())
    l2 = json.loads((out / "train_log.json").read_text())
    assert [e["step"] for e in l2] == list(range(1, 9))
    assert [e["loss"] for e in l2] == pytest.approx([e["loss"] for e in l1], abs=1e-4)
    assert wrote_lines(p) == [f"wrote {out}: " + wrote_lines(p)[0].split(": ", 1)[1]]  # once, by rank 0
    assert no_pickles(out) == []
    # rank 0 published through a temporary sibling, renamed in: nothing else is left beside the output
    assert sorted(x.name for x in out.parent.iterdir()) == ["ft"]


def test_accelerate_ddp_config_starts_two_and_a_killed_run_resumes(space, torchrun_run, tmp_path):
    """From another directory, with the shipped config: killed (SIGKILL, both ranks) after step 6 with the
    state saved at step 4, then resumed: the same weights as the uninterrupted two-process run, bit for bit."""
    ref = torchrun_run[0]
    out = tmp_path / "outs" / "ft"
    args = ["finetune", "--model", str(space / "base"), "-o", str(out), *FLAGS, "--save-every", "4", "--resume"]
    killed = accelerate(config(DDP_CFG, tmp_path), args, tmp_path, module="dist_driver", DELTAPORT_TEST_FAULT="6:0,1:kill")
    assert killed.returncode != 0 and not out.exists()
    assert (tmp_path / "outs" / ".ft.deltaport-work" / "trainer" / "checkpoint-4").is_dir()
    p = ok(accelerate(config(DDP_CFG, tmp_path), args, tmp_path))
    assert len(wrote_lines(p)) == 1
    assert settings(out)["world_size"] == 2
    assert json.loads((out / "deltaport.json").read_text())["resumed_from_step"] == 4
    a, b = load_sd(ref), load_sd(out)
    assert max_abs_diff(a, b) == 0.0
    assert (out / "checkpoints" / "step-4" / "model.safetensors").is_file()
    assert no_pickles(out) == []
    assert sorted(x.name for x in out.parent.iterdir()) == ["ft"]  # work folder and temp leftovers gone


def test_accelerate_fsdp_config_saves_a_full_checkpoint(space, one_process, torchrun_run):
    from transformers import AutoModelForCausalLM

    out = space / "fsdp"
    p = ok(accelerate(config(FSDP_CFG, space), ["finetune", "--model", str(space / "base"), "-o", str(out), *FLAGS], space))
    assert len(wrote_lines(p)) == 1 and settings(out)["world_size"] == 2
    full = load_sd(out)  # every tensor, whole: the same names, shapes and dtypes as one process saves
    assert max_abs_diff(load_sd(torchrun_run[0]), full) <= 1e-5
    assert max_abs_diff(load_sd(one_process), full) <= 1e-5
    assert no_pickles(out) == []
    ids = torch.tensor([[4, 11, 12, 10, 7]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(torchrun_run[0]).eval()(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_crashing_rank_fails_the_run_cleanly(space, tmp_path):
    out = tmp_path / "outs" / "ft"
    p = torchrun(["finetune", "--model", str(space / "base"), "-o", str(out), *FLAGS], tmp_path,
                 module="dist_driver", DELTAPORT_TEST_FAULT="2:1:raise")
    assert p.returncode == 1
    assert "rank 1 of 2: training failed: RuntimeError: injected failure at step 2" in p.stderr
    assert "Nothing was published" in p.stderr and wrote_lines(p) == []
    assert not out.exists() and list((tmp_path / "outs").iterdir()) == []  # no half output, no temp folder


@pytest.mark.skipif(DEVICE != "cpu", reason="about accelerate's --cpu flag")
def test_accelerate_cpu_flag_starting_one_process_is_warned(space, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate needs mpirun for several
    CPU processes); the run says so instead of silently training alone."""
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(space / "base"), "-o", str(out), "--data", str(SFT), "--steps", "1",
            "--batch-size", "8", "--device", "cpu", "--no-progress"]
    p = ok(accelerate(None, args, tmp_path, launch=["--cpu"]))
    assert "accelerate launch was asked for 2 processes but started 1" in p.stderr
    assert settings(out)["world_size"] == 1 and len(wrote_lines(p)) == 1


def test_eval_two_processes_split_the_items_and_equal_one(space, one_process, tmp_path):
    args = ["eval", str(one_process), "--tasks", str(TASK), "--device", DEVICE, "--no-cache", "-q"]
    (tmp_path / "c1").mkdir()
    (tmp_path / "c2").mkdir()
    ok(alone([*args, "-o", str(tmp_path / "one.json")], tmp_path, module="dist_driver",
             DELTAPORT_TEST_COUNT=str(tmp_path / "c1")))
    p = ok(torchrun([*args, "-o", str(tmp_path / "two.json")], tmp_path, module="dist_driver",
                    DELTAPORT_TEST_COUNT=str(tmp_path / "c2")))
    r1, r2 = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert r2["results"] == r1["results"]  # exactly: every metric and its standard error
    assert r2["details"][str(one_process)]["tiny_qa"]["n_samples"] == {"tiny_qa": {"original": 16, "effective": 16}}
    assert (r1["settings"]["world_size"], r2["settings"]["world_size"]) == (1, 2)
    n1 = int((tmp_path / "c1" / "rank-0").read_text())
    n2 = [int((tmp_path / "c2" / f"rank-{r}").read_text()) for r in (0, 1)]
    assert n1 == 16 * 6 and n2 == [48, 48]  # 16 questions × 6 choices, split in two
    assert len(wrote_lines(p)) == 1


def test_evolve_chain_under_torchrun_equals_one_process(space, tmp_path):
    """A two-version chain (``direct``: FT(M1), Δ, M2+Δ, FT(M2+Δ), four evaluations): under torchrun every
    fine-tune and evaluation runs in both processes, rank 0 alone diffs, applies and writes; the models
    match one process within the tolerance and the scores are equal."""
    import yaml

    from deltaport.evolve import slug
    from deltaport.testing import perturbed

    facts = json.loads((DATA / "facts.json").read_text())
    m1 = make_model("llama", seed=0)
    save(perturbed(m1, seed=1, scale=0.02), tmp_path / "m2", tokenizer=make_tokenizer(extra_words=list(facts)))
    chain = {"versions": [str(space / "base"), str(tmp_path / "m2")], "data": str(SFT), "device": DEVICE,
             "finetune": {"steps": 2, "lr": 3e-3, "batch_size": 4}, "strategies": ["direct"],
             "eval": {"tasks": [str(TASK)], "limit": 8}}
    (tmp_path / "chain.yaml").write_text(yaml.safe_dump(chain))
    ok(alone(["evolve", "chain.yaml", "-o", "one", "--no-progress"], tmp_path))
    p = ok(torchrun(["evolve", "chain.yaml", "-o", "two", "--no-progress"], tmp_path))
    one, two = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("one", "two"))
    assert two["scores"] == one["scores"] and len(two["scores"]) == 4
    assert two["computed"] == one["computed"]  # every step once, by rank 0's account
    for mid in ("FT(M1)", "FT(M2+Δ[FT(M1)])"):
        a, b = (tmp_path / r / "models" / slug(mid) for r in ("one", "two"))
        assert (settings(a)["world_size"], settings(b)["world_size"]) == (1, 2)
        assert max_abs_diff(load_sd(a), load_sd(b)) <= 1e-5
    steps = (tmp_path / "two" / "steps.jsonl").read_text().splitlines()
    assert len(steps) == len(two["computed"])  # written by rank 0 only
    assert p.stdout.count("step(s) computed in this call") == 1
