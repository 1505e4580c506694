"""Config: presets carry the released values, both modes share schedule timing, bad input is a clear error."""

from __future__ import annotations

import math

import pytest

from depthg.config import (
    MODES,
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    global_steps_to_iterations,
    load_config,
    save_config,
)
from depthg.utils import DepthGError


def test_every_preset_builds_in_both_modes():
    for name in PRESETS:
        for mode in MODES:
            cfg = Config.preset(name, mode)
            assert cfg.mode == mode
            assert cfg.name == f"{name}_{mode}"


def test_paper_run_values_match_released_script():
    # The authors' paper_reproduction.sh values (docs/method.md §11), written out by hand.
    c = Config.preset("cocostuff_vits8", "released")
    assert (c.dim, c.batch_size, c.feature_samples, c.depth_sampling) == (70, 32, 11, "fps")
    assert (c.pos_intra_weight, c.pos_intra_shift, c.neg_inter_shift) == (0.58, 0.07, 0.761)
    assert (c.depth_weight, c.depth_shift, c.depth_decay_factor, c.depth_decay_every) == (0.19, 0.03, 0.6, 250)
    assert c.steps == math.ceil(7000 / 3) == 2334
    b = Config.preset("cocostuff_vitb8", "released")
    assert b.depth_shift == 0.035909146298813595 and b.depth_weight == 0.16026274975444096
    # the script's 300 global steps = every 100 iterations (docs/fidelity.md §3.9)
    assert (b.dim, b.feature_samples, b.eval_every, b.depth_decay_every) == (90, 12, 50, 100)
    cs = Config.preset("cityscapes_vitb8", "released")
    assert (cs.depth_sampling, cs.centering, cs.dim) == ("random", "none", 100)
    p = Config.preset("potsdam_vits8", "released")
    assert (p.batch_size, p.classes, p.depth_decay_factor, p.five_crop) == (16, 3, 1.0, False)


def test_modes_differ_in_fixes_not_in_timing():
    from depthg.method.schedules import DepthDecaySchedule

    # the script's depth-decay intervals in global steps (paper_reproduction.sh)
    script = {"cocostuff_vits8": 250, "cocostuff_vitb8": 300, "cityscapes_vitb8": 400, "potsdam_vits8": 200}
    for name, every_global in script.items():
        rel, pap = Config.preset(name, "released"), Config.preset(name, "paper")
        assert rel.steps == pap.steps
        assert (rel.depth_decay_every, rel.sample_decay_every) == (pap.depth_decay_every, pap.sample_decay_every)
        assert (rel.decay_after_step, rel.sample_decay_at_start) == (True, True)
        assert (pap.decay_after_step, pap.sample_decay_at_start) == (False, False)
        # the released loop: global_step = 3 * iteration; a decay fires after iteration k when 3k % N == 0 and
        # k > 0, and acts from k + 1; paper mode's events fall on the same iterations, one iteration earlier
        sched = DepthDecaySchedule(1.0, 1.0, 0.5, rel.depth_decay_every, after_step=rel.decay_after_step)
        fired = [k for k in range(1, rel.steps) if (3 * k) % every_global == 0]
        assert [k for k in range(1, rel.steps) if sched.events(k) > sched.events(k - 1)] == [k + 1 for k in fired
                                                                                             if k + 1 < rel.steps]
        pap_events = [k for k in range(1, pap.steps) if pap.depth_decay_every and k % pap.depth_decay_every == 0]
        assert pap_events == fired
        assert (rel.depth_similarity, pap.depth_similarity) == ("released", "centred")
        assert rel.pos_intra_shift == pap.pos_intra_shift and rel.dim == pap.dim
    assert global_steps_to_iterations(300) == 100 and global_steps_to_iterations(250) == 250


def test_stego_and_synthetic_presets():
    s = Config.preset("stego")
    assert not s.use_depth and s.depth_sampling == "random" and s.depth_weight == 0.0
    syn = Config.preset("synthetic")
    assert syn.data_dir is None and syn.backbone == "embedded" and syn.feature_cache and not syn.eval_crf
    assert syn.res % 8 == 0 and syn.steps <= 1000


def test_unknown_key_lists_valid_keys_and_suggestion():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"batchsize": 4})
    msg = str(err.value)
    assert "batchsize" in msg and "batch_size" in msg and "did you mean" in msg and "feature_samples" in msg
    assert isinstance(err.value, DepthGError) and isinstance(err.value, ValueError)
    with pytest.raises(ConfigError, match="lr"):
        apply_overrides(Config(), ["lrr=0.1"])


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"mode": "exact"}, "mode"),
        ({"batch_size": 0}, "batch_size"),
        ({"depth_sampling": "grid"}, "depth_sampling"),
        ({"lr": -1.0}, "lr"),
        ({"dropout": 1.0}, "dropout"),
        ({"fov_deg": 200.0}, "fov_deg"),
        ({"classes": 1}, "classes"),
        ({"steps": 1.5}, "steps"),
        ({"num_neighbors": 40}, "num_neighbors"),
        ({"use_depth": False, "depth_sampling": "fps"}, "depth_sampling"),
        ({"amp": "fp8"}, "amp"),
    ],
)
def test_impossible_values_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        Config(**changes)


def test_yaml_json_roundtrip_and_overrides(tmp_path):
    cfg = Config.preset("synthetic")
    for suffix in (".yaml", ".json"):
        path = save_config(cfg, tmp_path / f"c{suffix}")
        assert load_config(path) == cfg
    with pytest.raises(ConfigError, match="suffix"):
        save_config(cfg, tmp_path / "c.txt")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    out = apply_overrides(cfg, ["steps=7", "weights=null", "backbone_kwargs={embed_dim: 32}", "name=123", "lr=1e-3"])
    assert out.steps == 7 and out.weights is None and out.backbone_kwargs == {"embed_dim": 32}
    assert out.name == "123" and out.lr == 1e-3 and cfg.steps != 7
    with pytest.raises(ConfigError, match="batch_size"):
        apply_overrides(cfg, ["batch_size=-3"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["steps"])


def test_mode_switch_converts_dependent_keys():
    """Switching mode (override or --mode) must not leave a hybrid of the two modes."""
    from depthg.config import apply_overrides

    released = Config.preset("cocostuff_vits8", "released")
    switched = apply_overrides(Config.preset("cocostuff_vits8", "paper"), ["mode=released"])
    assert switched.depth_similarity == released.depth_similarity == "released"
    assert switched.amp == released.amp == "off"  # the released code trains in fp32
    # the same decay interval (every 250 iterations), released timing flags
    from depthg.method.schedules import DepthDecaySchedule

    def events(cfg):
        sched = DepthDecaySchedule(cfg.depth_weight, cfg.depth_shift, cfg.depth_decay_factor,
                                   cfg.depth_decay_every, after_step=cfg.decay_after_step)
        return [round(sched.at(t)[0], 8) for t in range(0, 2334, 50)]

    assert events(switched) == events(released)
    back = apply_overrides(switched, ["mode=paper"])
    assert back.depth_similarity == "centred" and back.depth_decay_every == 250
    assert Config(mode="released").depth_similarity == "released"
    assert Config(mode="paper").depth_similarity == "centred"


def test_a_file_and_its_overrides_are_merged_then_validated_once(tmp_path):
    """``--config base.yaml depth_sampling=random``: base.yaml alone is invalid (FPS without depth), the merged
    config is valid, and both the library and the command line accept it."""
    from depthg.__main__ import _config_from_args, build_parser

    base = tmp_path / "base.yaml"
    base.write_text("use_depth: false\nsteps: 5\n")
    with pytest.raises(ConfigError, match="depth_sampling"):
        load_config(base)
    cfg = load_config(base, ["depth_sampling=random"])
    assert (cfg.use_depth, cfg.depth_sampling, cfg.steps) == (False, "random", 5)
    parse = build_parser().parse_args
    assert _config_from_args(parse(["train", "--config", str(base), "depth_sampling=random"])) == cfg
    with pytest.raises(ConfigError, match="depth_sampling"):
        _config_from_args(parse(["train", "--config", str(base)]))
    # --mode converts the file's mode-dependent keys first; the overrides still apply on top
    released = _config_from_args(parse(["train", "--config", str(base), "--mode", "released",
                                        "depth_sampling=random", "depth_similarity=product"]))
    assert (released.mode, released.amp, released.depth_similarity) == ("released", "off", "product")
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(base, ["depth_sampels=random"])


def test_building_a_config_reads_no_file(monkeypatch):
    """The embedded backbone's patch size reaches validation as a constant: no file is opened (and no
    module looked up) while a Config is built."""
    import builtins
    import io
    import pathlib
    from pathlib import Path

    def no_io(*args, **kwargs):
        raise AssertionError(f"file access while building a Config: {args!r}")

    for owner, name in ((builtins, "open"), (io, "open"), (pathlib.Path, "open"), (pathlib.Path, "read_text"),
                        (pathlib.Path, "read_bytes"), (pathlib.Path, "is_file"), (pathlib.Path, "exists")):
        monkeypatch.setattr(owner, name, no_io)
    cfg = Config(backbone="embedded", res=64, eval_res=64, feature_samples=8)
    assert Config.preset("synthetic").backbone == "embedded"
    with pytest.raises(ConfigError, match="multiple of the backbone's patch size 8"):
        Config(backbone="embedded", res=100)
    monkeypatch.undo()
    assert "sys.modules" not in (Path(__file__).resolve().parents[1] / "depthg" / "config.py").read_text()
    assert cfg.res == 64
