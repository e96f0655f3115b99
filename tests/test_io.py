"""The io layer's shared helpers, one of each: the JSON writer, the dtype parser, the pickle rule, the
writer's planned sizes, and the import direction (bytes reader below the checkpoint resolver)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hostile_cases as H
from deltaport.errors import CheckpointError, InputError, OutputError, RuntimeFailure


def test_write_json_bytes_order_and_refusal(tmp_path):
    from deltaport.io.atomic import COMMITTED, write_json

    p = tmp_path / "sub" / "r.json"
    obj = {"z": 1, "a": [1.5, None], "path": Path("/x/y"), "np": np.float32(0.25), "n": np.int64(3)}
    assert write_json(p, obj) == p
    want = json.dumps({"z": 1, "a": [1.5, None], "path": "/x/y", "np": 0.25, "n": 3}, indent=2) + "\n"
    assert p.read_bytes() == want.encode()  # indent 2, keys in their order, one final newline
    assert H.leftovers(p) == []
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        write_json(p, {"b": 2}, overwrite=False)
    assert p.read_bytes() == want.encode()
    COMMITTED.clear()
    write_json(p, [1], record=True)
    assert p.read_text() == "[\n  1\n]\n" and COMMITTED == [p]
    COMMITTED.clear()


def test_one_dtype_parser_a_bad_spelling_is_a_usage_error():
    from deltaport.io.tensors import parse_dtype, parse_dtype_name

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("FP64") is torch.float64
    assert parse_dtype(torch.float16) is torch.float16  # a torch dtype passes as is
    assert parse_dtype_name("fp32") == "float32"
    for bad in ("int3", None):
        with pytest.raises(InputError, match="unknown dtype .*; use one of float32, float64, bfloat16, float16") as ei:
            parse_dtype(bad)
        assert not isinstance(ei.value, CheckpointError)  # a usage error, not a broken checkpoint
        assert ei.value.exit_code == 2


def test_pickled_weight_names_follow_one_rule(tmp_path):
    from deltaport.io.checkpoint import is_pickled_weights, pickle_only, pickled_files

    names = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "adapter_model.bin", "weights.pt",
             "training_args.bin", "optimizer.pth", "model.safetensors.index.json"]
    assert [n for n in names if is_pickled_weights(n)] == names[:4]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert sorted(f.name for f in pickled_files(tmp_path)) == sorted(names[:4])
    assert pickle_only(tmp_path)


def test_writer_refuses_a_tensor_of_another_size_than_planned(tmp_path):
    from deltaport.io.writer import OutEntry, ShardedWriter

    w = ShardedWriter(tmp_path, [OutEntry("a", torch.float32, (4,))], shard_size=1 << 20)
    with pytest.raises(RuntimeFailure, match="internal: tensor a is 12 bytes, the header was planned with 16"):
        w.begin("a", 12)
    w.begin("a", 16)
    w.write(torch.arange(4, dtype=torch.float32))
    w.finalize()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["a"], torch.arange(4, dtype=torch.float32))


def test_reader_does_not_import_the_checkpoint_resolver():
    """One direction: ``checkpoint`` (headers, resolution) uses ``reader`` (bytes), never the reverse."""
    code = ("import sys, deltaport.io.reader; "
            "print('deltaport.io.checkpoint' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_one_header_check_for_local_and_hub_files():
    """``parse_header`` is what a hub file's header (read by range requests) and a local file's are checked by."""
    from deltaport.io.tensors import parse_header

    def raw(entry):
        return json.dumps({"__metadata__": {"format": "pt"}, "w": entry}).encode()

    ok = {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}
    assert parse_header(raw(ok), 64, 76, "f")["w"] == ok
    assert parse_header(raw(ok), 64, -1, "f")["w"] == ok  # size unknown
    cases = [
        (b"{not json", r"shard f: header is not valid JSON"),
        (b"[1, 2]", r"shard f: header is not a JSON object"),
        (raw({"dtype": "X9", "shape": [2], "data_offsets": [0, 4]}), r"tensor 'w' has a malformed header entry"),
        (raw({"dtype": "F32", "shape": [2], "data_offsets": [0]}), r"tensor 'w' has a malformed header entry"),
        (raw({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 12]}), r"tensor 'w' spans 12 bytes but its dtype "
                                                                           r"and shape need 24"),
        (raw(ok), r"tensor 'w' ends at byte 76 past the end of the file \(75 bytes\); the shard is truncated"),
    ]
    for data, msg in cases:
        with pytest.raises(CheckpointError, match=msg):
            parse_header(data, 64, 75, "f")


def test_a_signal_right_after_the_temp_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The CLI turns SIGTERM into an exception wherever the main thread is; right after the temporary
    folder exists, it must still be removed (a probe that signals as soon as the folder appears hit this)."""
    import pathlib

    from deltaport.io.atomic import TMP_TAG, atomic_output_dir

    real_mkdir = pathlib.Path.mkdir

    def mkdir_then_signal(self, *a, **k):
        real_mkdir(self, *a, **k)
        if TMP_TAG in self.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir_then_signal)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out):
            pass
    assert not out.exists() and H.leftovers(out) == []


@pytest.mark.parametrize("index, message", [
    ({"weight_map": {"w": "../outside.bin"}}, "invalid shard file '../outside.bin'"),
    ({"weight_map": {"w": "sub/pytorch_model-1.bin"}}, "invalid shard file"),
    ([1, 2], "has no weight_map"),
    ({"weight_map": {"w": "pytorch_model-2.bin"}}, "names shard pytorch_model-2.bin which is missing"),
], ids=["parent", "subdir", "not-an-object", "missing"])
def test_a_pickled_index_is_checked_like_a_safetensors_index(tmp_path, index, message):
    """pytorch_model.bin.index.json goes through the same checks as model.safetensors.index.json: a shard
    outside the directory is never loaded, and a malformed index is a CheckpointError (exit 2)."""
    from deltaport.io.checkpoint import open_checkpoint

    d = tmp_path / "m"
    d.mkdir()
    torch.save({"w": torch.ones(2)}, d / "pytorch_model-1.bin")
    torch.save({"w": torch.full((2,), 7.0)}, tmp_path / "outside.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(d, allow_pickle=True)


def test_a_multi_process_finetune_output_replaces_the_old_one_only_when_the_new_one_is_in(tmp_path, monkeypatch):
    """A multi-process run's output (rank 0 writes it) is published like every other output (io.atomic.publish_dir):
    the previous output is moved aside, not deleted first, so a failed rename puts it back."""
    import errno
    import os

    from deltaport import finetune as F
    from deltaport.io import atomic

    out = tmp_path / "ft"
    out.mkdir()
    (out / "weights").write_text("old")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # the rename fallback, as without renameat2
    real_rename = os.rename

    def rename(src, dst):
        if ".deltaport-tmp-" in str(src):
            raise OSError(errno.EXDEV, "cross-device link", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        with F._output_dir(out, True, []) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]

    monkeypatch.setattr(os, "rename", real_rename)
    with F._output_dir(out, True, []) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]
