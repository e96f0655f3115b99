"""Content hashes remembered on disk (``deltaport.io.hashmemo``): a remembered hash is used only for the very
files it was computed from; any change to a file (also one that keeps its size and mtime) is hashed anew;
files written just now are not remembered; ``off`` turns the memo off; a run that finds its inputs
remembered hashes none of their bytes and names the same hashes on its card."""

from __future__ import annotations

import os
import re
import time

import pytest

import deltaport
from deltaport import testing as T
from deltaport.io import checkpoint as C
from deltaport.io import hashmemo


@pytest.fixture
def memo_dir(tmp_path, monkeypatch):
    d = tmp_path / "memo"
    monkeypatch.setenv(hashmemo.ENV, str(d))
    return d


def _model(path, seed=0):
    return T.save(T.make_model("llama", seed=seed), path)


def _fresh_hash(path, monkeypatch) -> str:
    with monkeypatch.context() as m:
        m.setenv(hashmemo.ENV, "off")
        return C.content_hash(path)


def test_remembered_only_for_the_same_files(tmp_path, memo_dir, monkeypatch):
    model = _model(tmp_path / "m")
    true = _fresh_hash(model, monkeypatch)
    assert C.content_hash(model) == true and not list(memo_dir.glob("*.txt"))  # just written: racy, not stored
    monkeypatch.setattr(hashmemo, "RACY_SECONDS", 0.0)
    time.sleep(0.05)
    assert C.content_hash(model) == true
    (entry,) = memo_dir.glob("*.txt")
    assert entry.read_text().strip() == true
    entry.write_text("f" * 64 + "\n")  # the memo is what answers now: a planted value comes back unread
    assert C.content_hash(model) == "f" * 64
    # rewrite one weight byte in place, then restore the file's size and mtime: ctime still tells
    shard = sorted(model.glob("*.safetensors"))[0]
    st = os.stat(shard)
    time.sleep(0.05)
    with open(shard, "r+b") as f:
        f.seek(st.st_size - 1)
        last = f.read(1)
        f.seek(st.st_size - 1)
        f.write(bytes([last[0] ^ 1]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_size == st.st_size and os.stat(shard).st_mtime_ns == st.st_mtime_ns
    changed = C.content_hash(model)
    assert changed != "f" * 64 and changed != true and changed == _fresh_hash(model, monkeypatch)


def test_off_and_unwritable_memo(tmp_path, monkeypatch):
    model = _model(tmp_path / "m")
    monkeypatch.setattr(hashmemo, "RACY_SECONDS", 0.0)
    monkeypatch.setenv(hashmemo.ENV, "off")
    assert hashmemo.cache_dir() is None and hashmemo.Memo.begin(model.glob("*.safetensors")) is None
    true = C.content_hash(model)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv(hashmemo.ENV, str(blocker / "memo"))  # cannot be created: hashed each time, no error
    assert C.content_hash(model) == true == C.content_hash(model)


def test_a_run_with_remembered_inputs_hashes_nothing_and_names_the_same_hashes(tmp_path, memo_dir, monkeypatch):
    paths = {n: _model(tmp_path / n, seed=s) for s, n in enumerate(("sb", "sf", "tb"))}
    monkeypatch.setattr(hashmemo, "RACY_SECONDS", 0.0)
    time.sleep(0.05)
    made = []
    real_init = C.StreamedHash.__init__

    def spy(self, ck):
        real_init(self, ck)
        made.append((self, self.known))  # as found when the run began

    monkeypatch.setattr(C.StreamedHash, "__init__", spy)
    cards = []
    for k in range(2):
        made.clear()
        out = tmp_path / f"out{k}"
        deltaport.transfer(paths["sb"], paths["sf"], paths["tb"], out)
        cards.append((out / "README.md").read_text())
        assert len(made) == 3
        assert [known is not None for _, known in made] == [k == 1] * 3, k  # the second run found all three
        if k == 1:
            assert all(h.h.hexdigest() == C.hashlib.sha256().hexdigest() for h, _ in made)  # not a byte hashed
    assert cards[0] == cards[1]
    named = dict(re.findall(r"local directory `(\w+)` \(content sha256 `([0-9a-f]{64})`\)", cards[1]))
    assert named == {n: _fresh_hash(p, monkeypatch) for n, p in paths.items()}
