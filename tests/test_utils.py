"""Shared helpers: atomic writes leave no half-written files, unsafe checkpoints are refused unexecuted."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch

from depthg import utils
from depthg.utils import (
    DepthGError,
    UnsafeCheckpointError,
    atomic_torch_save,
    atomic_write,
    command_line,
    StageClock,
    StageMark,
    get_device,
    pool_map,
    safe_torch_load,
    sha256_file,
    timed,
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


def test_command_line_pastes_back_into_a_shell_as_the_same_words(tmp_path, monkeypatch):
    """The reference is bash itself: the recorded command, run with HOME set, gives back argv word for word."""
    home = tmp_path / "home dir"
    monkeypatch.setenv("HOME", str(home))
    argv = ["--role", "held-out world: report (no choice)", "--world-dir", str(home / "cache/it's here"),
            "--out", str(home), "--n", "3", "", "a*b", "x=$HOME", "/abs/path"]
    line = command_line("printf '%s\\0'", argv)
    assert str(home) not in line and "~/" in line  # no machine path in the report
    done = subprocess.run(["bash", "-c", line], capture_output=True, env=dict(os.environ, HOME=str(home)))
    assert done.returncode == 0 and done.stdout.decode().split("\0")[:-1] == argv
    monkeypatch.setattr(sys, "argv", ["prog.py", "--k", "two words"])
    assert command_line("python prog.py") == "python prog.py --k 'two words'"  # default: this process's args


# ------------------------------------------------------------------------------------------------
# worker processes: in order, the same results, and never a hang
# ------------------------------------------------------------------------------------------------
def _affine(shared: tuple[int, int], x: int) -> int:
    a, b = shared
    return a * x + b


def _dies_in_a_worker(shared: int, x: int) -> int:
    """Kills its worker process (a segfaulting C extension, an out-of-memory kill); fine in the caller's."""
    if multiprocessing.parent_process() is not None and x == 3:
        os._exit(7)
    return shared + x


def _hangs_in_a_worker(shared: int, x: int) -> int:
    if multiprocessing.parent_process() is not None and x == 2:
        time.sleep(600)
    return shared + x


def test_pool_map_returns_in_order_what_the_serial_loop_returns():
    items = list(range(23))
    serial = list(pool_map(_affine, items, 0, shared=(3, 1)))
    assert serial == [3 * x + 1 for x in items]
    assert list(pool_map(_affine, iter(items), 2, shared=(3, 1))) == serial  # items may be a one-pass iterator
    assert list(pool_map(_affine, [], 2, shared=(3, 1))) == []


def test_pool_map_finishes_in_this_process_when_a_worker_dies_or_hangs(capsys):
    assert list(pool_map(_dies_in_a_worker, range(8), 2, shared=10)) == [10 + x for x in range(8)]
    assert "the pool of 2 worker processes failed" in capsys.readouterr().err
    t0 = time.perf_counter()
    assert list(pool_map(_hangs_in_a_worker, range(6), 2, shared=1, timeout_s=3)) == [1 + x for x in range(6)]
    assert time.perf_counter() - t0 < 300  # the hung worker was killed, not waited for
    assert "no result within 3 s" in capsys.readouterr().err


def test_pool_map_keeps_the_item_whose_submit_found_the_pool_broken(monkeypatch, capsys):
    """A worker that dies is noticed either by a pending result or by the next submit; in the second case the
    item being submitted was already drawn from ``items`` and must still be computed (here, deterministically:
    the fifth submit of an item raises as a broken pool's submit does)."""
    real_submit = utils._submit
    calls = []

    def breaks_on_the_fifth_item(pool, fn, x):
        if fn is _affine:
            calls.append(x)
            if len(calls) == 5:
                raise BrokenProcessPool("A child process terminated abruptly")
        return real_submit(pool, fn, x)

    monkeypatch.setattr(utils, "_submit", breaks_on_the_fifth_item)
    assert list(pool_map(_affine, range(9), 2, shared=(2, 5))) == [2 * x + 5 for x in range(9)]
    assert calls == [0, 1, 2, 3, 4]  # item 4 went to the pool's submit, which failed; it ran here instead
    assert "BrokenProcessPool" in capsys.readouterr().err


def test_pool_map_ends_after_torch_threads_ran(tmp_path):
    """No fork of a process whose torch threads are running: a pool started after a multi-threaded matmul ends
    (run in a subprocess with a timeout, since a deadlock would hang the test run itself)."""
    script = tmp_path / "after_threads.py"
    script.write_text(
        "import torch\n"
        "from depthg.utils import pool_map\n"
        "from test_utils import _affine\n"
        "if __name__ == '__main__':\n"
        "    torch.set_num_threads(2)\n"
        "    torch.randn(600, 600) @ torch.randn(600, 600)\n"
        "    print(sum(pool_map(_affine, range(50), 2, shared=(1, 0))))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(sum(range(50)))


# ------------------------------------------------------------------------------------------------
# where the time went
# ------------------------------------------------------------------------------------------------
def test_stage_clock_counts_nested_stages_for_themselves(monkeypatch):
    import depthg.utils as utils

    now = [100.0]  # a clock the test moves: seconds are exact
    monkeypatch.setattr(utils.time, "perf_counter", lambda: now[0])
    with timed("ignored") as mark:  # no active clock: nothing is recorded anywhere
        assert isinstance(mark, StageMark)
    clock = StageClock().start()
    try:
        with timed("five-crop") as mark:
            mark.cached = True
        with timed("training", rename={"evaluation": "validation"}):
            now[0] += 40.0
            with timed("evaluation"):
                now[0] += 5.0
            now[0] += 2.0
            with timed("evaluation"):
                now[0] += 5.0
        with timed("final evaluation", rename={"evaluation": "final evaluation"}):
            now[0] += 1.0
            with timed("evaluation"):
                now[0] += 2.0
        now[0] += 0.5
    finally:
        clock.stop()
    with timed("after"):  # the clock is no longer active
        now[0] += 1000.0
    assert clock.seconds == {"five-crop": 0.0, "training": 42.0, "validation": 10.0, "final evaluation": 3.0}
    assert clock.cached == {"five-crop": True, "training": False, "validation": False, "final evaluation": False}
    now[0] = 100.0 + 55.5 + 5.0  # the summary is read 5 s after the last stage
    assert clock.summary() == ("time: five-crop 0.0 s (cached), training 42.0 s, validation 10.0 s, "
                               "final evaluation 3.0 s, other 5.5 s (total 60.5 s)")


def test_transient_progress_bars_are_erased_in_a_terminal_only():
    """A finished evaluation or cache-build bar is erased in a terminal; under a Jupyter kernel tqdm draws a widget
    and a closed widget cannot be drawn again from a saved notebook, so there it stays."""
    from depthg.utils import transient_bar_leave

    assert transient_bar_leave() is False  # pytest: tqdm.auto is the text bar
