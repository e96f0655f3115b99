"""Shared test set-up: offline, one thread, tiny model families built on the fly."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# content hashes remembered in a directory of this session only (never the user's ~/.cache)
os.environ.setdefault("DELTAPORT_HASH_CACHE", tempfile.mkdtemp(prefix="deltaport-test-hashes-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def tree_hash(path: str | Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative name -> digest)."""
    path = Path(path)
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def load_sd(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint dir, via the safetensors library."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, for bit-for-bit comparison."""
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


_REF_FMT = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_INT = {2: torch.int16, 4: torch.int32}


def exact_transfer(t: torch.Tensor, f: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``t + scale·(f − b)`` rounded once to ``t``'s dtype from the exact value (λ: its float64 value), by the
    independent reference (tests/reference.py: float64, and Fractions near a rounding boundary)."""
    from reference import round_transfer

    args = [x.double().numpy() for x in (t, f, b)]
    out = round_transfer(*args, float(scale), _REF_FMT[t.dtype]).astype(f"<i{t.element_size()}")
    return torch.from_numpy(out.view(f"<i{t.element_size()}")).view(_INT[t.element_size()]).view(t.dtype).reshape(t.shape)


def assert_bit_equal(sd1: dict, sd2: dict, *, ignore_zero_sign: bool = False) -> None:
    assert sorted(sd1) == sorted(sd2), (sorted(set(sd1) ^ set(sd2)))
    for k in sd1:
        a, b = sd1[k], sd2[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if ignore_zero_sign and a.is_floating_point():
            a = torch.where(a == 0, torch.zeros_like(a), a)
            b = torch.where(b == 0, torch.zeros_like(b), b)
        assert torch.equal(bits(a), bits(b)), f"{k}: {(bits(a) != bits(b)).sum().item()} elements differ"


_FAMILY_CACHE: dict = {}

#: (source base, source fine-tune, target) at the first elements of every tensor of a ``signed_zeros``
#: family; None keeps the model's own (non-zero) value. Every sign combination the arithmetic meets.
SIGNED_ZEROS = (
    (-0.0, -0.0, -0.0),  # untouched by the fine-tune, −0.0 everywhere
    (0.0, -0.0, 0.0),  # the fine-tune flips the sign of a zero
    (None, -0.0, None),  # the fine-tune zeroes a weight (to −0.0)
    (-0.0, 0.0, -0.0),
    (-0.0, None, -0.0),  # a −0.0 weight the fine-tune moves
    (0.0, -0.0, -0.0),  # Δ = −0.0 onto a target −0.0
)


def plant_signed_zeros(base, ft, tgt) -> None:
    """Write :data:`SIGNED_ZEROS` into the first elements of every parameter of the three models."""
    with torch.no_grad():
        for models in zip(base.parameters(), ft.parameters(), tgt.parameters()):
            for i, row in enumerate(SIGNED_ZEROS[: min(p.numel() for p in models)]):
                for p, v in zip(models, row):
                    if v is not None:
                        p.view(-1)[i] = v


def minus_zero_to_plus(sd: dict) -> dict:
    """``sd`` with every −0.0 written as +0.0 (what an exact-zero IEEE sum of mixed-sign zeros gives)."""
    return {k: torch.where(v == 0, torch.zeros_like(v), v) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="session")
def family_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="session")
def family(family_root):
    """family(arch, dtype) -> {source_base, source_finetuned, target_base} dirs (several shards each).

    source_finetuned = base + N(0, 1e-3) (a fine-tune-sized change), target = base + N(0, 5e-3).
    ``signed_zeros=True``: the same with :data:`SIGNED_ZEROS` planted at the start of every tensor."""
    from deltaport import testing as T

    def make(arch: str = "llama", dtype: torch.dtype = torch.bfloat16, signed_zeros: bool = False):
        key = (arch, dtype, signed_zeros)
        if key not in _FAMILY_CACHE:
            root = family_root / f"{arch}-{str(dtype).replace('torch.', '')}{'-zeros' if signed_zeros else ''}"
            base = T.make_model(arch, seed=0, dtype=dtype)
            ft = T.perturbed(base, seed=1, scale=1e-3)
            tgt = T.perturbed(base, seed=2, scale=5e-3)
            if signed_zeros:
                plant_signed_zeros(base, ft, tgt)
            paths = {}
            for name, m in (("source_base", base), ("source_finetuned", ft), ("target_base", tgt)):
                paths[name] = T.save(m, root / name)
            _FAMILY_CACHE[key] = paths
        return _FAMILY_CACHE[key]

    return make


# -------------------------------------------------------------------------- engine chunk sizes

#: chunk sizes (elements) that cut the tiny models' rows (32, 48 and 64 elements) mid-row: one below a
#: row, one above a row and a multiple of none. The real-model tier uses 4099 (rows of 576 and 1536).
CUT_CHUNKS = (7, 100)



@pytest.fixture(params=[None, *CUT_CHUNKS], ids=lambda c: "chunk-default" if c is None else f"chunk-{c}")
def engine_chunk(request, monkeypatch):
    """Run the test with the engine's default chunk size and with chunk sizes that cut rows.

    Every ``deltaport.transfer``/``diff``/``apply`` call of the test that does not pass ``chunk_elems``
    uses this size (their keyword default is replaced for the test), and the fixture checks afterwards
    that every engine the test ran used it. Override the sizes with
    ``@pytest.mark.parametrize("engine_chunk", [...], indirect=True)``."""
    from deltaport import engine as E
    from deltaport import api

    size = request.param or E.DEFAULT_CHUNK_ELEMS
    for fn in (api.transfer, api.diff, api.apply):
        monkeypatch.setitem(fn.__kwdefaults__, "chunk_elems", size)
    seen: list[int] = []
    real_run = E.Engine.run

    def spy(self, *args, **kwargs):
        seen.append(self.chunk)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(E.Engine, "run", spy)
    yield size
    assert seen and set(seen) == {size}, f"engines ran with chunk sizes {sorted(set(seen))}, expected {size}"


# -------------------------------------------------------------------------- real-model tier
@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct checkpoints for the real-model tier (tests/smollm2.py: fetched, converted
    and derived from nothing, cached under ~/.cache/deltaport-tests unless DELTAPORT_TEST_CACHE=off)."""
    import shutil

    import smollm2 as S

    tmp = tmp_path_factory.mktemp("realmodel")
    yield S.ensure(tmp)
    shutil.rmtree(tmp, ignore_errors=True)  # a build without the cache (~1.5 GB) goes with the session
