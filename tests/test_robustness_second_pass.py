"""Trust, second pass (issue 24): no silent NaN, one command per folder, no write over what a command did not
make, inputs read as the user meant them, caches that notice every change and work read-only, Ctrl-C and
leftovers. One test per case of the issue; each failed on the code before it (tried with PYTHONPATH on that
tree).

The helpers (the tiny config, training quietly, the CLI in-process) are those of ``test_robustness.py``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthg.build import TrainError, load_checkpoint
from depthg.config import ConfigError, load_config, parse_overrides, read_config_file
from depthg.data import ImageDirectory
from depthg.data.common import CorruptFileError
from depthg.data.prepare import CroppedDataset, PreparationError, compute_knn, five_crop, prepare_training_data
from depthg.train import ReplaceOwn, train
from depthg.utils import DiskFullError, FolderBusyError, OutputNotOwnedError, folder_lock, json_text
from depthg.world import make_world

from test_robustness import cli_overrides, fresh_world, quiet_train, run_cli, tiny_backbone, tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust2") / "world"
    return make_world(root, 2, 2, size=(64, 128), seed=3, progress=False)


def strict_json(text: str):
    """Parse JSON as strict parsers do: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def trained(world: Path, tmp_path: Path, name: str = "run", **changes) -> Path:
    """A finished tiny run; returns its folder."""
    quiet_train(tiny_config(world, tmp_path / "cache", tmp_path / name, **changes))
    return tmp_path / name


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_size_png(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as a PNG over ``path`` keeping the file's byte size (trailing bytes after IEND, which PNG
    readers ignore) and modification time: an edit that `touch -r` or an archive would leave unseen."""
    size, stat = path.stat().st_size, path.stat()
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG", compress_level=9)
    data = buffer.getvalue()
    assert len(data) <= size, "the edited PNG must not be larger than the original"
    path.write_bytes(data + bytes(size - len(data)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == size and path.stat().st_mtime_ns == stat.st_mtime_ns


# ------------------------------------------------------------------------------------------------
# 1. silent NaN: divergence is an error, evaluation refuses non-finite weights, JSON is strict
# ------------------------------------------------------------------------------------------------
def test_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(world, tmp_path / "cache", tmp_path / "run", lr=1e30, steps=6, checkpoint_every=1)
    with pytest.raises(TrainError, match=r"diverged: a loss became NaN or infinite at step 2 .*checkpoint_last.pt "
                                         r"\(step 1\), kept"):
        quiet_train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert ckpt["step"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "run" / "results.json").exists()
    # the CLI: one line, exit 2, nothing on stdout
    args = cli_overrides(world, tmp_path) + [f"output_dir={tmp_path / 'cli'}", "lr=1e30", "steps=4"]
    code, out, err = run_cli(["train", "--no-progress", *args], monkeypatch, capsys)
    assert code == 2 and out == "" and err.startswith("depthg: error: training diverged") and "Traceback" not in err
    assert "no checkpoint had been written yet" in err


def test_evaluation_refuses_non_finite_and_overflowing_weights(world, tmp_path, monkeypatch, capsys):
    run = trained(world, tmp_path)
    ckpt = load_checkpoint(run / "checkpoint_last.pt")
    for name, scale, expected in (("nan", float("nan"), "holds NaN or infinite values"),
                                  ("overflow", 1e30, "predictions .* are NaN or infinite")):  # finite weights
        bad = dict(ckpt, model={k: v * scale if v.is_floating_point() else v for k, v in ckpt["model"].items()})
        torch.save(bad, tmp_path / f"{name}.pt")
        code, out, err = run_cli(["eval", str(tmp_path / f"{name}.pt"), "--no-progress"], monkeypatch, capsys)
        assert code == 2 and out == "" and err.startswith("depthg: error:"), (name, err)
        assert __import__("re").search(expected, err), (name, err)
        assert not (tmp_path / f"{name}_eval.json").exists()


def test_json_outputs_are_strict_and_absent_classes_are_null(world, tmp_path, monkeypatch, capsys):
    args = cli_overrides(world, tmp_path)
    code, out, err = run_cli(["train", "--no-progress", *args], monkeypatch, capsys)
    assert code == 0, err
    summary = strict_json(out)  # stdout
    results = strict_json((tmp_path / "run" / "results.json").read_text())
    iou = results["final"]["metrics"]["cluster"]["iou"]
    assert None in iou and all(v is None or np.isfinite(v) for v in iou)  # classes absent from the split: null
    assert summary["final"]["metrics"]["cluster"]["iou"] == iou
    for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines():
        strict_json(line)
    code, out, err = run_cli(["eval", str(tmp_path / "run" / "checkpoint_last.pt"), "--no-progress"], monkeypatch, capsys)
    assert code == 0, err
    strict_json(out)
    assert None in strict_json((tmp_path / "run" / "checkpoint_last_eval.json").read_text())["cluster"]["iou"]


# ------------------------------------------------------------------------------------------------
# 2. one command per folder
# ------------------------------------------------------------------------------------------------
def _cli_process(argv: list[str], logs: Path) -> subprocess.Popen:
    """``python -m depthg argv`` in a child process, its stdout and stderr in files under ``logs`` (not pipes:
    a process it starts cannot hold them open), with faulthandler on, so SIGABRT prints where it is."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "depthg", *argv], stdout=out, stderr=err, env=env, cwd=ROOT,
                                preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal() -> None:
    """In the child before it starts: Ctrl-C delivered and handled as in a terminal. A child inherits an ignored
    or blocked SIGINT (Python then never raises KeyboardInterrupt, as for a background job); something earlier
    in a long test session can leave the test process so, and its child then trained on after SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _finish(proc: subprocess.Popen, logs: Path, timeout: float) -> tuple[bytes, bytes]:
    """Wait for ``proc``; if it does not end in ``timeout`` s, abort it and fail with its threads' tracebacks."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler writes every thread's traceback to stderr
        proc.wait(timeout=30)
        pytest.fail(f"the process did not end within {timeout} s:\n{_tail(logs)}")
    return (logs / "stdout").read_bytes(), (logs / "stderr").read_bytes()


def _tail(logs: Path) -> str:
    """The end of the child's stderr, for a failure message."""
    return (logs / "stderr").read_bytes().decode(errors="replace")[-6000:]


def _wait_for(path: Path, proc: subprocess.Popen, logs: Path, timeout: float = 240) -> None:
    """Wait until ``proc`` (logging under ``logs``) makes ``path``; fail with its stderr if it ends or stalls."""
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, f"the process ended with {proc.returncode} before {path} appeared:\n{_tail(logs)}"
        assert time.time() - start < timeout, f"{path} did not appear within {timeout} s:\n{_tail(logs)}"
        time.sleep(0.2)


def test_second_train_into_a_held_folder_is_refused_and_ctrl_c_leaves_one_line(world, tmp_path, monkeypatch, capsys):
    """Two trains into one output_dir: the second is refused while the first runs. Ctrl-C on the first: one
    line, exit 130, no temporary file; its folder (config and log, no checkpoint) is then simply rerun."""
    out_dir = tmp_path / "run"
    args = cli_overrides(world, tmp_path)
    logs = tmp_path / "first"
    first = _cli_process(["train", "--no-progress", *args, "steps=100000", "checkpoint_every=0"], logs)
    try:
        _wait_for(out_dir / "log.jsonl", first, logs)
        code, out, err = run_cli(["train", "--no-progress", *args, "seed=1"], monkeypatch, capsys)
        assert code == 2 and "another command is writing into the run folder" in err, err
        first.send_signal(signal.SIGINT)
        stdout, stderr = _finish(first, logs, timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130 and stderr.decode().strip() == "depthg: interrupted", stderr.decode()[-2000:]
    assert stdout == b"" and not list(out_dir.glob(".*.tmp")) and not list(tmp_path.rglob("*.tmp"))
    assert not (out_dir / "checkpoint_last.pt").exists() and (out_dir / "log.jsonl").is_file()
    # interrupted before its first checkpoint: rerun without --overwrite
    code, out, err = run_cli(["train", "--no-progress", *args], monkeypatch, capsys)
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (out_dir / "log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.filterwarnings("ignore:backbone .* has random weights")
def test_ablations_hold_their_folder_and_refuse_another_configuration(world, tmp_path):
    from depthg.lab.ablation import AblationError, run_ablation

    overrides = cli_overrides(world, tmp_path)
    out_dir = tmp_path / "ablation"
    with folder_lock(out_dir, "ablation folder"):  # as if another `ablate` were writing there
        with pytest.raises(FolderBusyError, match="another command is writing into the ablation folder"):
            run_ablation(["stego"], [0], steps=2, out_dir=out_dir, overrides=overrides, progress=False)
    first = run_ablation(["stego"], [0], steps=2, out_dir=out_dir, overrides=overrides, progress=False)
    kept = files_of(out_dir / "stego")
    with pytest.raises(AblationError, match=r"another configuration \(steps: 2 there, 3 now\)"):
        run_ablation(["stego"], [0], steps=3, out_dir=out_dir, overrides=overrides, progress=False)
    assert files_of(out_dir / "stego") == kept
    # the same configuration with more seeds shares the folder and reuses the finished run
    again = run_ablation(["stego"], [0, 1], steps=2, out_dir=out_dir, overrides=overrides, progress=False)
    assert json_text(again["runs"]["stego"][0]) == json_text(first["runs"]["stego"][0])  # reused, not retrained
    assert len(again["runs"]["stego"]) == 2
    strict_json((out_dir / "ablation.json").read_text())  # one seed's spread (NaN) is null on disk
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(OutputNotOwnedError, match="notes.txt"):
        run_ablation(["stego"], [0], steps=2, out_dir=tmp_path / "mine", overrides=overrides, progress=False)


# ------------------------------------------------------------------------------------------------
# 3. never write over what the command did not make
# ------------------------------------------------------------------------------------------------
def test_eval_output_never_replaces_a_file_it_did_not_make(world, tmp_path, monkeypatch, capsys):
    run = trained(world, tmp_path)
    before = files_of(run)
    ckpt = str(run / "checkpoint_last.pt")
    for target in ("checkpoint_last.pt", "results.json", "config.yaml"):
        code, out, err = run_cli(["eval", ckpt, "--output", str(run / target), "--no-progress"], monkeypatch, capsys)
        assert code == 2 and err.startswith("depthg: error:") and target in err, (target, err)
    assert files_of(run) == before
    code, _, err = run_cli(["eval", ckpt, "--output", str(tmp_path / "e.json"), "--no-progress"], monkeypatch, capsys)
    code2, _, err2 = run_cli(["eval", ckpt, "--output", str(tmp_path / "e.json"), "--no-progress", "eval_flip=false"],
                             monkeypatch, capsys)
    assert code == code2 == 0, err + err2  # an earlier evaluation is replaced
    assert strict_json((tmp_path / "e.json").read_text())["protocol"]["flip"] is False


def test_eval_predictions_of_two_settings_never_mix(world, tmp_path, monkeypatch, capsys):
    run = trained(world, tmp_path)
    ckpt = str(run / "checkpoint_last.pt")
    folder = run / "checkpoint_last_eval"
    assert run_cli(["eval", ckpt, "--predictions", "2", "--no-progress"], monkeypatch, capsys)[0] == 0
    assert len(list(folder.glob("*.png"))) == 6
    assert run_cli(["eval", ckpt, "--predictions", "1", "--no-progress", "eval_flip=false"], monkeypatch, capsys)[0] == 0
    assert len(list(folder.glob("*.png"))) == 3  # the first evaluation's PNGs went with it
    assert json.loads((folder / "predictions.json").read_text())["protocol"]["flip"] is False


def test_crop_never_writes_into_or_renames_a_users_folder(world, tmp_path, monkeypatch, capsys):
    args = cli_overrides(world, tmp_path)
    for name in ("mine", "theirs.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("keep")
    code, _, err = run_cli(["crop", "--out", str(tmp_path / "mine"), "--no-progress", *args], monkeypatch, capsys)
    assert code == 2 and "notes.txt" in err and "did not make" in err, err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    assert not (tmp_path / "mine.partial").exists()
    # a folder next to the output named like five-crop's work folder is someone else's too: never emptied
    code, _, err = run_cli(["crop", "--out", str(tmp_path / "theirs"), "--no-progress", *args], monkeypatch, capsys)
    assert code == 2 and "theirs.partial" in err, err
    assert (tmp_path / "theirs.partial" / "notes.txt").read_text() == "keep"
    # an empty folder, or five-crop's own folder, is fine
    (tmp_path / "empty").mkdir()
    assert run_cli(["crop", "--out", str(tmp_path / "empty"), "--no-progress", *args], monkeypatch, capsys)[0] == 0
    assert run_cli(["crop", "--out", str(tmp_path / "empty"), "--no-progress", *args], monkeypatch, capsys)[0] == 0


def test_knn_and_depth_outputs_never_replace_other_files(world, tmp_path, monkeypatch, capsys):
    from depthg.data import Cityscapes
    from depthg.depth import build_tiny_random_depth_model, estimate_depth_for_dataset, load_depth_model

    args = cli_overrides(world, tmp_path)
    (tmp_path / "other.npz").write_bytes(b"precious")
    code, _, err = run_cli(["knn", "--out", str(tmp_path / "other.npz"), "--no-progress", *args], monkeypatch, capsys)
    assert code == 2 and "did not make" in err and (tmp_path / "other.npz").read_bytes() == b"precious", err
    assert run_cli(["knn", "--out", str(tmp_path / "nns.npz"), "--no-progress", *args], monkeypatch, capsys)[0] == 0
    (tmp_path / "depth").mkdir()
    (tmp_path / "depth" / "notes.txt").write_text("keep")
    model = load_depth_model(build_tiny_random_depth_model(tmp_path / "model"), device="cpu")
    with pytest.raises(OutputNotOwnedError, match="depth cache"):
        estimate_depth_for_dataset(Cityscapes(world, "train", classes="world"), model, tmp_path / "depth", progress=False)
    assert sorted(p.name for p in (tmp_path / "depth").iterdir()) == ["notes.txt"]


def test_synthesize_refuses_a_folder_of_other_files(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    argv = ["synthesize", str(tmp_path / "mine"), "--n-train", "1", "--n-val", "1", "--height", "32", "--width", "64",
            "--no-progress"]
    code, _, err = run_cli(argv, monkeypatch, capsys)
    assert code == 2 and "a.txt" in err, err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["a.txt"]
    argv[1] = str(tmp_path / "world")
    assert run_cli(argv, monkeypatch, capsys)[0] == 0 and run_cli(argv, monkeypatch, capsys)[0] == 0  # its own: fine


def test_output_dir_of_files_no_run_made_is_refused(world, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(OutputNotOwnedError, match="notes.txt"):
            quiet_train(tiny_config(world, tmp_path / "cache", tmp_path / "mine"), overwrite=overwrite)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_overwrite_keeps_the_old_run_until_the_new_one_passed_its_first_step(world, tmp_path, monkeypatch):
    import depthg.train as train_module

    out_dir = trained(world, tmp_path, eval_every=1)
    old = files_of(out_dir)
    real_step = train_module.train_step

    def failing_at(step: int):
        def step_fn(run, it):
            if it + 1 == step:
                raise RuntimeError(f"CUDA out of memory at step {step}")
            return real_step(run, it)
        return step_fn

    monkeypatch.setattr(train_module, "train_step", failing_at(1))
    with pytest.raises(RuntimeError, match="out of memory at step 1"):
        quiet_train(tiny_config(world, tmp_path / "cache", out_dir, seed=1), overwrite=True)
    assert files_of(out_dir) == old  # the old run is back, whole
    monkeypatch.setattr(train_module, "train_step", failing_at(2))
    with pytest.raises(RuntimeError, match="out of memory at step 2"):
        quiet_train(tiny_config(world, tmp_path / "cache", out_dir, seed=1), overwrite=True)
    assert not (out_dir / "results.json").exists() and (out_dir / "config.yaml").is_file()  # past step 1: replaced
    assert load_config(out_dir / "config.yaml").seed == 1
    # a replacement killed before its first step (its aside folder left behind) is undone by the next command
    monkeypatch.setattr(train_module, "train_step", real_step)
    quiet_train(tiny_config(world, tmp_path / "cache", out_dir, seed=2), overwrite=True)
    good = files_of(out_dir)
    aside = out_dir / ".depthg-replaced"
    aside.mkdir()
    for name in ("config.yaml", "log.jsonl", "checkpoint_last.pt", "results.json", ".depthg-run.json"):
        os.replace(out_dir / name, aside / name)
    (out_dir / "config.yaml").write_text("half a new run")
    with pytest.raises(TrainError, match="holds another run"):  # the old run is back, and protected again
        quiet_train(tiny_config(world, tmp_path / "cache", out_dir, seed=3))
    assert files_of(out_dir) == good


def test_notebook_owner_replaces_only_its_own_runs(world, tmp_path):
    mine = ReplaceOwn("notebook train_cityscapes")
    out_dir = tmp_path / "run"
    quiet_train(tiny_config(world, tmp_path / "cache", out_dir), overwrite=mine)
    quiet_train(tiny_config(world, tmp_path / "cache", out_dir, seed=1), overwrite=mine)  # its own: replaced
    assert load_config(out_dir / "config.yaml").seed == 1
    other = trained(world, tmp_path, "cli_run")  # made by the CLI / Python (no owner)
    with pytest.raises(TrainError, match="replaces only its own runs"):
        quiet_train(tiny_config(world, tmp_path / "cache", other, seed=1), overwrite=mine)


# ------------------------------------------------------------------------------------------------
# 4. inputs read as the user meant them
# ------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied_to_images_and_labels(tmp_path):
    """A phone photo stored sideways with orientation 6 (rotate 90 degrees clockwise to view), labelled on the
    image as viewers show it (upright): image and label must line up pixel for pixel."""
    upright = np.zeros((40, 24, 3), np.uint8)  # as displayed: 24 wide, 40 high; the top 10 rows are "sky"
    upright[:10] = (200, 220, 250)
    label = np.zeros((40, 24), np.uint8)
    label[:10] = 1
    stored = np.rot90(upright, k=1)  # what the camera wrote: turned counter-clockwise (40 wide, 24 high)
    exif = Image.Exif()
    exif[0x0112] = 6
    for split in ("train", "val"):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "imgs" / split / "a.jpg", exif=exif, quality=100)
        Image.fromarray(label).save(tmp_path / "labels" / split / "a.png")
    item = ImageDirectory(tmp_path, "train", n_classes=2)[0]
    assert tuple(item["img"].shape) == (3, 40, 24) and tuple(item["label"].shape) == (40, 24)
    sky = item["img"][2] > 0.9  # the blue channel of the sky
    assert torch.equal(sky, item["label"] == 1)


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]'] + [
        f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcd", "bcde")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("backbone_kwargs:\n" + "\n".join("  " + line for line in levels) + "\n")  # 9**5 values
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than"):
        read_config_file(bomb)
    assert time.perf_counter() - start < 1.0
    (tmp_path / "loop.yaml").write_text("backbone_kwargs: &a {x: *a}\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        read_config_file(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_overrides(["backbone_kwargs=" + "{" + ", ".join(levels).replace(": ", ": ") + "}"])


def test_duplicated_config_keys_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 2\nlr: 0.1\nsteps: 5\n")
    with pytest.raises(ConfigError, match=r"'steps' is given twice \(lines 1 and 3\)"):
        read_config_file(tmp_path / "a.yaml")
    (tmp_path / "a.json").write_text('{"steps": 2, "steps": 5}')
    with pytest.raises(ConfigError, match="'steps' is given twice"):
        read_config_file(tmp_path / "a.json")
    with pytest.raises(ConfigError, match="'embed_dim' is given twice"):
        parse_overrides(["backbone_kwargs={embed_dim: 32, embed_dim: 64}"])


def test_notebook_parameters_are_validated_like_the_cli():
    from depthg.lab.notebook import validate_parameters

    namespace = {"overwrite": "false", "smoke": "True", "steps": "12", "size": "[64, 128]", "data_dir": None}
    validate_parameters(namespace, "train_cityscapes")
    assert namespace == {"overwrite": False, "smoke": True, "steps": 12, "size": [64, 128], "data_dir": None}
    validate_parameters(own := {"overwrite": "own"}, "train_cityscapes")
    assert own["overwrite"] == ReplaceOwn("notebook train_cityscapes")
    for params, expected in (({"steps": 2.7}, "'steps'.*expected an integer"),
                             ({"steps": "abc"}, "'steps'.*expected an integer"),
                             ({"preset": "cityscapes_vitb9"}, "'preset'.*did you mean cityscapes_vitb8"),
                             ({"overwrite": "maybe"}, "'overwrite'"), ({"n_examples": 0}, "'n_examples'")):
        with pytest.raises(ConfigError, match=expected):
            validate_parameters(params, "train_cityscapes")


def test_training_notebook_checks_its_parameters_and_never_replaces_a_run_it_did_not_make(world, tmp_path):
    papermill = pytest.importorskip("papermill")
    cli_run = trained(world, tmp_path)  # made by the CLI / Python, not by the notebook
    before = files_of(cli_run)

    def execute(**params) -> str:
        try:
            papermill.execute_notebook(str(ROOT / "notebooks" / "train_cityscapes.ipynb"), str(tmp_path / "out.ipynb"),
                                       parameters={"smoke": True, "cache_dir": str(tmp_path / "cache"), **params},
                                       kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False,
                                       log_output=False, execution_timeout=600)
        except papermill.PapermillExecutionError as err:
            return f"{err.ename}: {err.evalue}"
        return ""

    assert "'steps'" in execute(output_dir=str(tmp_path / "nb"), steps="abc")  # -p steps abc
    assert "holds a run made by another command" in execute(output_dir=str(cli_run))  # the default: "own"
    assert "holds another run" in execute(output_dir=str(cli_run), overwrite="false")  # -p overwrite false
    assert files_of(cli_run) == before


def test_explicit_data_dir_or_weights_that_do_not_exist_are_errors(tmp_path):
    from depthg.lab.notebook import choose_run

    common = dict(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", device="cpu")
    with pytest.raises(ConfigError, match="data_dir=.*cityscpes.*no such folder"):
        choose_run("Cityscapes", "cityscapes_vitb8", tmp_path / "cityscpes", "embedded", **common)
    with pytest.raises(ConfigError, match="weights='/nowhere/dino.pth' cannot be loaded"):
        choose_run("Cityscapes", "cityscapes_vitb8", tmp_path, "/nowhere/dino.pth", **common)
    with pytest.raises(ConfigError, match="needs both"):
        choose_run("Cityscapes", "cityscapes_vitb8", tmp_path, None, **common)
    assert not choose_run("Cityscapes", "cityscapes_vitb8", None, None, **common).real  # nothing given: the world


# ------------------------------------------------------------------------------------------------
# 5. caches: content digests, crop digests, read-only, disk full
# ------------------------------------------------------------------------------------------------
def test_source_edit_keeping_size_and_mtime_is_noticed(world, tmp_path, capfd):
    root = fresh_world(world, tmp_path)
    cfg = tiny_config(root, tmp_path / "cache", tmp_path / "run1")
    quiet_train(cfg)
    image = sorted((root / "leftImg8bit" / "train").rglob("*.png"))[0]
    arr = np.asarray(Image.open(image).convert("RGB"))
    time.sleep(0.05)
    same_size_png(image, np.ascontiguousarray(arr[:, ::-1]))  # mirrored: new content, same size and mtime
    capfd.readouterr()
    quiet_train(cfg.replace(output_dir=str(tmp_path / "run2")))
    err = capfd.readouterr().err
    assert "1 source item(s) changed" in err and "the images' content" in err, err
    crops = CroppedDataset(next(p for p in (tmp_path / "cache" / "crops").iterdir() if p.is_dir()), "train")
    top_left = torch.from_numpy(np.ascontiguousarray(arr[:, ::-1][:32, :64])).permute(2, 0, 1).float() / 255
    assert torch.equal(crops[0]["img"], top_left)


def test_cached_crop_replaced_by_one_of_the_same_size_is_caught(world, tmp_path, capfd):
    cfg = tiny_config(world, tmp_path / "cache", tmp_path / "run", feature_cache=False)
    data = prepare_training_data(cfg, backbone=tiny_backbone(), progress=False)
    crop = Path(data["crop_dir"]) / "img" / "train" / "000003.png"
    good = crop.read_bytes()
    same_size_png(crop, np.zeros((32, 64, 3), np.uint8))
    with pytest.raises(PreparationError, match="000003.png does not have the SHA-256"):
        CroppedDataset(data["crop_dir"], "train")
    capfd.readouterr()
    prepare_training_data(cfg, backbone=tiny_backbone(), progress=False)
    assert "missing or modified crop files" in capfd.readouterr().err
    assert crop.read_bytes() == good


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_complete_cache_is_used_without_a_lock_or_a_write(world, tmp_path, monkeypatch):
    """Simulated: the tests may run as root, where a chmod does not stop writes; every lock in the cache and
    every write there fails instead. What this proves: nothing takes a lock or writes into a complete cache."""
    import depthg.utils as utils

    cache = tmp_path / "cache"
    quiet_train(tiny_config(world, cache, tmp_path / "run1"))
    before = _snapshot(cache)
    real_lock, real_mkstemp = utils.FileLock, utils.tempfile.mkstemp

    def no_lock_in_cache(path, *a, **k):
        assert not str(path).startswith(str(cache)), f"a lock was taken in the read-only cache: {path}"
        return real_lock(path, *a, **k)

    def no_write_in_cache(*a, dir=None, **k):
        assert not str(dir).startswith(str(cache)), f"a file was written in the read-only cache: {dir}"
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(utils, "FileLock", no_lock_in_cache)
    monkeypatch.setattr(utils.tempfile, "mkstemp", no_write_in_cache)
    quiet_train(tiny_config(world, cache, tmp_path / "run2"))
    assert _snapshot(cache) == before


def test_complete_cache_on_a_read_only_mount(world, tmp_path):
    """The real thing: the cache bind-mounted read-only (in a private mount namespace: needs `unshare` and the
    right to mount, else skipped)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount --bind {tmp_path} {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private read-only mount here: {probe.stderr.decode().strip()}")
    cache = tmp_path / "cache"
    quiet_train(tiny_config(world, cache, tmp_path / "run1"))
    cfg = tiny_config(world, cache, tmp_path / "run2")
    cfg.save(tmp_path / "cfg.yaml")
    command = (f"mount --bind {cache} {cache} && mount -o remount,ro,bind {cache} && touch {cache}/x 2>/dev/null "
               f"&& exit 3; exec {sys.executable} -W ignore -m depthg train --config {tmp_path / 'cfg.yaml'} --no-progress")
    done = subprocess.run(["unshare", "--mount", "sh", "-c", command], capture_output=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert strict_json(done.stdout.decode())["steps"] == 2 and not (cache / "x").exists()


def test_disk_full_while_writing_the_feature_cache_is_a_clear_error(world, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match="not enough disk space for the feature cache file"):
        quiet_train(tiny_config(world, tmp_path / "cache", tmp_path / "run"))
    features = tmp_path / "cache" / "features"
    assert not [p for p in features.iterdir() if p.suffix != ".lock"]  # nothing half-written
    monkeypatch.undo()
    quiet_train(tiny_config(world, tmp_path / "cache", tmp_path / "run2"))


# ------------------------------------------------------------------------------------------------
# 6. signals and leftovers
# ------------------------------------------------------------------------------------------------
COMMANDS = {  # each command's handler, and the arguments that reach it
    "synthesize": ("cmd_synthesize", ["synthesize", "x"]), "prepare": ("cmd_prepare", ["prepare"]),
    "depth": ("cmd_depth", ["depth", "--out", "x"]), "crop": ("cmd_crop", ["crop", "--out", "x"]),
    "knn": ("cmd_knn", ["knn", "--out", "x"]), "train": ("cmd_train", ["train"]), "eval": ("cmd_eval", ["eval", "x.pt"]),
    "ablate": ("cmd_ablate", ["ablate"]),
}


@pytest.mark.parametrize("command", [*COMMANDS, "pretrain"])
def test_ctrl_c_is_one_line_and_exit_130_in_every_command(command, monkeypatch, capsys):
    import depthg.__main__ as cli
    from depthg.world import pretrain

    def interrupted(*_):
        raise KeyboardInterrupt

    if command == "pretrain":
        monkeypatch.setattr(pretrain, "run_pretrain_from_args", interrupted)
        argv = ["pretrain"]
    else:
        handler, argv = COMMANDS[command]
        monkeypatch.setattr(cli, handler, interrupted)
    code, out, err = run_cli(argv, monkeypatch, capsys)
    assert (code, out, err) == (130, "", "depthg: interrupted\n")


def test_killed_checkpoint_writes_leave_no_temporary_files(world, tmp_path):
    out_dir = trained(world, tmp_path)
    leftover = out_dir / ".checkpoint_last.pt.k1ll3d_x.tmp"  # a write killed between create and rename
    leftover.write_bytes(b"half a checkpoint")
    quiet_train(tiny_config(world, tmp_path / "cache", out_dir, steps=3), resume=True)
    assert not leftover.exists() and load_checkpoint(out_dir / "checkpoint_last.pt")["step"] == 3


def test_tiny_image_and_dangling_symlink_are_named(tmp_path):
    data = tmp_path / "data"
    (data / "imgs" / "train").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(data / "imgs" / "train" / f"{i}.png")
    ghost = data / "imgs" / "train" / "ghost.png"
    ghost.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(CorruptFileError, match=r"ghost.png is a symbolic link to .*nowhere.png, which does not exist"):
        ImageDirectory(data, "train", n_classes=2)  # without labels: never skipped silently
    ghost.unlink()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(data / "imgs" / "train" / "tiny.png")
    with pytest.raises(PreparationError, match=r"empty crop for the 1x1 image .*tiny.png"):
        five_crop(ImageDirectory(data, "train", n_classes=2), tmp_path / "crops", progress=False)


def test_checkpoint_problems_are_one_line_errors_naming_the_key(world, tmp_path, monkeypatch, capsys):
    run = trained(world, tmp_path)
    ckpt = load_checkpoint(run / "checkpoint_last.pt")
    variants = {
        "renamed": (dict(ckpt, model={k.replace("head.", "segment."): v for k, v in ckpt["model"].items()}),
                    "missing ['head."),
        "noconfig": ({k: v for k, v in ckpt.items() if k != "config"}, "has no 'config'"),
        "newer": (dict(ckpt, format="depthg-train-v2"), "written by a newer version of depthg"),
    }
    for name, (content, expected) in variants.items():
        torch.save(content, tmp_path / f"{name}.pt")
        code, out, err = run_cli(["eval", str(tmp_path / f"{name}.pt"), "--no-progress"], monkeypatch, capsys)
        assert code == 2 and expected in err and f"{name}.pt" in err and "Traceback" not in err, (name, err)
    code, out, err = run_cli(["eval", str(run / "checkpoint_last.pt"), "dim=16", "--no-progress"], monkeypatch, capsys)
    assert code == 2 and "'head.linear.weight' has shape (8, 32, 1, 1)" in err and "(16, 32, 1, 1)" in err, err
