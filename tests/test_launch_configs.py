"""The accelerate configs in configs/: accepted by accelerate's own loader and launch-line checks, with
the launcher each one selects. (Running them is tests/test_distributed.py's work, for the CPU configs.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LINE = ["-m", "deltaport.cli.main", "finetune", "--model", "INIT", "--data", "sft.jsonl", "-o", "FT",
        "--recipe", "paper", "--micro-batch-size", "1"]


def _launch_args(cfg: Path, n: int):
    """What `accelerate launch --config_file CFG --num_processes N LINE` resolves to (nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(cfg), "--num_processes", str(n), *LINE])
    args, _, _ = _validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", ["accelerate_cpu_ddp.yaml", "accelerate_cpu_fsdp.yaml", "accelerate_fsdp.yaml",
                                  "accelerate_deepspeed_zero3.yaml"])
def test_config_loads_and_every_key_is_a_launch_option(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    ClusterConfig.from_yaml_file(CONFIGS / name)  # unknown top-level keys are refused here
    options = {o for a in launch_command_parser()._actions for o in a.option_strings}
    raw = yaml.safe_load((CONFIGS / name).read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section, {}):
            flag = key if key.startswith("fsdp") or section == "deepspeed_config" else f"fsdp_{key}"
            assert f"--{flag}" in options, f"{name}: {section}.{key} is not an accelerate launch option"


def test_cpu_configs_start_two_processes_with_torchrun_and_no_mixed_precision():
    for name in ("accelerate_cpu_ddp.yaml", "accelerate_cpu_fsdp.yaml"):
        raw = yaml.safe_load((CONFIGS / name).read_text())
        assert raw["mixed_precision"] == "no" and raw["use_cpu"] is True
        args = _launch_args(CONFIGS / name, 2)
        # not the --cpu / MULTI_CPU path, which starts one process without mpirun
        assert (args.multi_gpu or args.use_fsdp) and not args.cpu and args.num_processes == 2
    text = (CONFIGS / "accelerate_cpu_ddp.yaml").read_text().lower()
    assert "fsdp" not in text and "deepspeed" not in text
    fsdp = yaml.safe_load((CONFIGS / "accelerate_cpu_fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_deepspeed_zero3_config_and_launch_line():
    """Checked without running: deepspeed is not installed on the CPU machines (and ZeRO-3 here is a GPU
    config: bf16, NCCL). The launch line selects accelerate's DeepSpeed launcher with ZeRO stage 3 and the
    16-bit weights gathered at save (a full checkpoint)."""
    args = _launch_args(CONFIGS / "accelerate_deepspeed_zero3.yaml", 4)
    assert args.use_deepspeed and args.num_processes == 4 and args.mixed_precision == "bf16"
    assert (str(args.zero_stage), str(args.zero3_save_16bit_model).lower(), str(args.zero3_init_flag).lower()) == (
        "3", "true", "true")
    assert args.module and args.training_script == "deltaport.cli.main"
    assert args.training_script_args[:1] == ["finetune"]


_OPEN_GROUP = """
import os, sys, tempfile
import torch.distributed as dist
from deltaport.cli.main import main
store = os.path.join(tempfile.mkdtemp(), "store")
dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
assert dist.is_initialized()
rc = main(sys.argv[1:])
print("initialized-after", dist.is_initialized(), "rc", rc)
"""


@pytest.mark.parametrize("argv", [["--version"], ["inspect", "/nonexistent-dir"]])
def test_cli_closes_an_open_process_group_when_a_command_ends(argv, tmp_path):
    """A launch's gloo group left open at exit aborts the process at interpreter shutdown (SIGABRT,
    "terminate called without an active exception": tests/test_distributed.py saw it once in ~10 CI runs);
    every command, one that succeeds and one that fails on bad input, closes it before returning."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _OPEN_GROUP, *argv], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "initialized-after False" in p.stdout, p.stdout + p.stderr[-2000:]


_EXIT = """
import atexit, sys
import torch.distributed
from deltaport.cli.main import exit_process
atexit.register(lambda: sys.stdout.write("atexit ran;"))
sys.stdout.write("buffered;")
try:
    exit_process(3)
except SystemExit as exc:
    sys.stdout.write(f"SystemExit {exc.code};")
    raise
"""


@pytest.mark.parametrize("world", ["1", "2"])
def test_exit_process_keeps_code_output_and_atexit_and_skips_finalisation_in_a_launch(world):
    """In a multi-process launch the CLI ends with os._exit after flushing and running the atexit handlers
    (a gloo worker thread still holding a tensor aborts the process in interpreter finalisation); alone it
    exits normally through SystemExit. Either way: the same exit code, every byte written, atexit run."""
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _EXIT], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "WORLD_SIZE": world, "RANK": "0", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 3, p.stderr[-3000:]
    if world == "2":
        assert p.stdout == "buffered;atexit ran;", p.stdout + p.stderr[-2000:]
    else:
        assert p.stdout == "buffered;SystemExit 3;atexit ran;", p.stdout + p.stderr[-2000:]


def test_release_process_group_is_a_no_op_without_torch_distributed_loaded():
    import subprocess
    import sys

    code = ("import sys; from deltaport.devices import release_process_group; release_process_group(); "
            "print('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stdout + p.stderr
