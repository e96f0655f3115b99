"""The package declares ranges, not pins, and installing it into an environment that already has
torch (2.13 here) plans no change to torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _requirements(extras: bool) -> list[str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"])
    if extras:
        reqs += proj["optional-dependencies"]["all"]
    return reqs


def test_no_exact_pins_and_the_lower_bounds_the_code_needs():
    reqs = _requirements(extras=True)
    assert not [r for r in reqs if "==" in r or "~=" in r or "===" in r]
    spec = {re.split(r"[<>=!~ \[]", r, 1)[0].lower().replace("_", "-"): r for r in reqs}
    assert "transformers>=5" in spec["transformers"]  # float warmup_steps is a ratio from 5 on
    assert "huggingface-hub>=1.3" in spec["huggingface-hub"].replace("_", "-")  # `hf` CLI; what transformers 5 needs
    assert "trl>=0.19" in spec["trl"]  # SFTConfig(assistant_only_loss=...)
    assert "torch>=2.4,<3" in spec["torch"]


@pytest.mark.slow
def test_installing_into_an_environment_with_torch_changes_no_torch(tmp_path):
    """``pip install --dry-run`` of the declared requirements against this environment (with the local
    torch wheel folder, where one is configured) plans no change to the installed torch. (Other
    packages may be planned: torch's own metadata asks for a newer setuptools than some environments have.)"""
    import torch

    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(report),
                        *_requirements(extras=True)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    planned = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert "torch" not in planned, f"pip would replace torch {torch.__version__} with {planned['torch']}"
    assert not {"transformers", "huggingface-hub", "safetensors"} & set(planned), planned


def test_every_package_data_pattern_names_files_that_exist():
    """A package-data entry that matches nothing ships nothing and misleads the reader."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for pkg, patterns in data.items():
        base = ROOT / "src" / pkg.replace(".", "/")
        for pat in patterns:
            assert [p for p in base.glob(pat) if p.is_file()], f"package-data {pkg}: {pat} matches no file"
