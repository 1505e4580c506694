"""Shared helpers: atomic writes leave no half-written files, unsafe checkpoints are refused unexecuted."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from depthg.utils import (
    DepthGError,
    UnsafeCheckpointError,
    atomic_torch_save,
    atomic_write,
    get_device,
    safe_torch_load,
    sha256_file,
)


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("partial")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"], "the temporary file must be cleaned up"
    with atomic_write(target, "w") as handle:
        handle.write("new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~umask, "written files get the usual permissions"


def test_torch_round_trip_and_hash(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3)}
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(state, path)
    loaded = safe_torch_load(path)
    assert torch.equal(loaded["w"], state["w"]) and int(loaded["step"]) == 3
    assert len(sha256_file(path)) == 64


class _Evil:
    def __reduce__(self):
        return (open, (str(_Evil.marker), "w"))


def test_unsafe_pickle_is_refused_without_running(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        torch.save({"x": _Evil()}, handle, pickle_module=pickle)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        safe_torch_load(path)
    assert not _Evil.marker.exists()


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        safe_torch_load(tmp_path / "nope.pt")


def test_device():
    assert get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DepthGError, match="CUDA"):
            get_device("cuda")
