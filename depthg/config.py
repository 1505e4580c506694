"""One flat, validated configuration for every DepthG / STEGO run, with the paper's presets.

The config is a single dataclass of plain values (nanoGPT style): no nested objects, no hydra. Everything
the trainer, the evaluation and the data preparation need is a field here, so a run is fully described by
one YAML/JSON file (written next to every checkpoint).

Presets (``Config.preset(name, mode)``) hold the values of the authors' reproduction script on top of
their default config, in full precision (docs/method.md §11).

``mode`` is a preset of fidelity choices (docs/fidelity.md): ``"paper"`` keeps *the same hyper-parameters
and the same training length* as the released runs and applies only the fixes; ``"released"`` computes what
the released code computes. It fills the keys left at None (:data:`MODE_DEFAULTS`: the depth similarity,
autocast and the two released timing flags) and picks the released functions of ``depthg.method.released``
(``depthg.build.Fidelity``). Decay intervals count iterations in both modes.

Every field is validated in ``__post_init__``: an unknown key is an error listing the valid keys (with
close-match suggestions), an impossible value is an error naming the key and the allowed values. A config
file and its ``key=value`` overrides are merged first and validated once, as merged (:func:`load_config`);
building a Config reads no file (the embedded backbone's patch size is :data:`EMBEDDED_PATCH_SIZE`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from depthg.method.lhp import LHP_STRATEGIES
from depthg.method.losses import CENTERINGS, DEPTH_SIMILARITIES, PAPER_DEPTH_SIMILARITY, CorrelationTerms
from depthg.method.released import RELEASED_ITERATIONS, global_steps_to_iterations
from depthg.method.sampling import SAMPLING_STRATEGIES, UNPROJECTIONS
from depthg.utils import DepthGError, atomic_write, read_json_strict

__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "read_config_file",
    "save_config",
    "apply_overrides",
    "check_value",
    "check_preset",
    "load_yaml",
    "parse_overrides",
    "merge_values",
    "PRESETS",
    "MODES",
]


class ConfigError(DepthGError, ValueError):
    """A configuration key is unknown or a value is outside what the workbench supports."""


MODES = ("paper", "released")
DATASETS = ("cityscapes", "cocostuff", "potsdam", "directory")
# The method's own choices (depth sampling, depth similarity, centring, LHP strategy) and its defaults are
# defined in depthg.method and read from there.
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
# keys holding text: non-empty strings (the optional ones may be None); overrides keep their raw text
STRING_KEYS = ("name", "output_dir", "cache_dir", "backbone", "device", "train_split", "val_split", "depth_source")
OPTIONAL_STRING_KEYS = ("data_dir", "weights", "depth_model")
# the smallest value of each integer key, in the order they are checked (eval_max_images, threads, crf_workers
# may be None)
INTEGER_MINIMUM = dict(
    seed=0, res=8, eval_res=8, knn_k=1, num_neighbors=1, num_workers=0, world_n_train=1, world_n_val=1,
    world_seed=0, dim=1, extra_clusters=0, steps=0, batch_size=1, feature_samples=1, neg_samples=0,
    depth_decay_every=0, sample_decay_every=0, sample_min_side=0, eval_every=0, eval_batch_size=1,
    eval_max_images=1, threads=1, checkpoint_every=0, log_every=1, crf_workers=0,
)
#: what each mode sets where a key is None (``decay_after_step`` and ``sample_decay_at_start`` are the
#: released timing: ``depthg.method.schedules.decay_events``, docs/fidelity.md §3.9-3.10).
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper": dict(depth_similarity=PAPER_DEPTH_SIMILARITY, amp="auto", decay_after_step=False,
                  sample_decay_at_start=False),
    "released": dict(depth_similarity="released", amp="off", decay_after_step=True, sample_decay_at_start=True),
}
#: the STEGO terms' defaults, owned by the loss (``Config()`` builds ``CorrelationTerms()``).
_TERMS = CorrelationTerms()
PRESETS = (
    "cocostuff_vits8",
    "cocostuff_vitb8",
    "cityscapes_vitb8",
    "potsdam_vits8",
    "stego",
    "synthetic",
)


@dataclass
class Config:
    """All settings of one run. Field groups follow the pipeline (data -> backbone -> head -> loss -> loop).

    Units: ``steps``, ``depth_decay_every`` and ``sample_decay_every`` count training iterations (one
    optimizer step of each of the three optimisers).
    """

    # --- run -----------------------------------------------------------------------------------
    name: str = "depthg"
    mode: str = "paper"
    seed: int = 0
    device: str = "auto"
    output_dir: str = "runs/depthg"

    # --- data -------------------------------------------------------------------------------------
    dataset: str = "cityscapes"
    # Dataset root itself (e.g. the folder holding leftImg8bit/). None = the embedded synthetic world,
    # rendered once into cache_dir by the data preparation.
    data_dir: str | None = None
    # 27 | 19 for Cityscapes, "world" = the classes the synthetic world renders; 3 | 6 for Potsdam.
    classes: int | str = 27
    train_split: str = "train"
    val_split: str = "val"
    cache_dir: str = ".depthg_cache"  # git-ignored; caches never go next to the source images
    res: int = 224
    eval_res: int = 320
    five_crop: bool = True
    crop_ratio: float = 0.5
    depth_source: str = "zoedepth"  # "gt" (synthetic ground truth), "disparity", or a depth model id
    depth_model: str | None = None  # transformers hub id / local folder for depth estimation
    # depth values fed to the model: "auto" = released mode: the released 0..255 min-max values,
    # paper mode: the depth cache's values (metres for metric sources); or "none" | "minmax" | "minmax255"
    depth_normalization: str = "auto"
    knn_k: int = 30
    num_neighbors: int = 7
    num_workers: int = 0  # loader processes (evaluation, kNN); threads reading training crops and building the cache
    world_n_train: int = 48  # synthetic world size (only used when data_dir is None)
    world_n_val: int = 16
    world_size: list[int] = field(default_factory=lambda: [256, 512])
    world_seed: int = 0

    # --- backbone and head (docs/method.md §5) ----------------------------------------------------
    backbone: str = "vit_small_patch8_224"
    weights: str | None = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int = 70
    dropout: float = 0.1  # Dropout2d p at both head inputs and on the correlation-target features
    extra_clusters: int = 0

    # --- optimisation (docs/method.md §5) ---------------------------------------------------------
    steps: int = 2334
    batch_size: int = 32
    lr: float = 5e-4
    probe_lr: float = 5e-3
    # autocast on CUDA only; "auto" = bf16 when supported, else off. None = by mode: the released code
    # trains in fp32, so released mode resolves to "off", paper mode to "auto" (MODE_DEFAULTS).
    amp: str | None = None
    # torch CPU threads during train() (None = torch's default). On a small CPU shared with other
    # processes, 1 thread was ~25x faster per step than 2 (synthetic preset, measured 2026-11-24).
    threads: int | None = None

    # --- STEGO loss (docs/method.md §3); defaults: depthg.method.losses.CorrelationTerms -------------
    feature_samples: int = 11
    # Spatial centring of the feature correlation (docs/method.md §3.2; "none" = pointwise False).
    # "released": subtract the per-query mean, then add back the global mean of F (what the released
    # code computes and what every preset's shifts were tuned with, so both modes use it in the presets);
    # "paper": the STEGO paper's literal S3 without the add-back (shifts then act relative to 0).
    centering: str = _TERMS.centering
    zero_clamp: bool = _TERMS.zero_clamp
    neg_samples: int = _TERMS.neg_samples
    pos_intra_weight: float = _TERMS.pos_intra_weight
    pos_intra_shift: float = _TERMS.pos_intra_shift
    pos_inter_weight: float = _TERMS.pos_inter_weight
    pos_inter_shift: float = _TERMS.pos_inter_shift
    neg_inter_weight: float = _TERMS.neg_inter_weight
    neg_inter_shift: float = _TERMS.neg_inter_shift

    # --- DepthG (docs/method.md §4, §6, §8) -------------------------------------------------------
    use_depth: bool = True
    depth_weight: float = 0.19
    depth_shift: float = 0.03
    # None = by mode (MODE_DEFAULTS); all options: depthg.method.losses.DEPTH_SIMILARITIES.
    depth_similarity: str | None = None
    depth_decay_factor: float = 0.6
    depth_decay_every: int = 250
    depth_sampling: str = "fps"
    fps_random_start: bool = False
    # 3D points of FPS and the 3D depth similarities: "fov" = a pinhole of fov_deg over the crop (an unknown
    # camera, the released call's intent), "camera" = each crop's calibrated camera (the dataset's, e.g.
    # Cityscapes camera/*.json, followed through the five-crop and the resize; docs/method.md §6.1)
    unprojection: str = "fov"
    fov_deg: float = 90.0
    sample_decay_factor: float = 0.9
    sample_decay_every: int = 1000  # 0 = off
    sample_min_side: int = 1
    # the released timing (None = by mode): a decay acts from the iteration after its event, and the
    # sample-count decay also fires at iteration 0 (docs/fidelity.md §3.9-3.10)
    decay_after_step: bool | None = None
    sample_decay_at_start: bool | None = None

    # --- local hidden positives (docs/method.md §7; off in every released command) ----------------
    lhp: bool = False
    lhp_strategy: str = "depth"
    lhp_quantile: float = 0.01
    lhp_weight: float = 0.2
    lhp_depth_weight: float = 1.0
    lhp_weight_balance: bool = False

    # --- loop, evaluation, checkpoints ------------------------------------------------------------
    feature_cache: bool = False
    eval_every: int = 100
    eval_batch_size: int = 8
    eval_max_images: int | None = None  # None = the whole validation split
    eval_crf: bool = False
    # processes running the dense CRF of the final evaluation (None = num_workers; 0 or 1 = in this process)
    crf_workers: int | None = None
    eval_flip: bool = True
    checkpoint_every: int = 100
    log_every: int = 10

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first impossible value (key, value, allowed)."""
        # The order of these steps is the order in which errors are detected: keep it.
        self._resolve_mode_defaults()
        self._validate_strings_and_choices()
        self._validate_integers()
        self._validate_numbers()
        self._validate_flags_and_shapes()
        self._validate_depth_needs()
        self._validate_against_data()

    def _resolve_mode_defaults(self) -> None:
        """Fill the keys left at None from the mode's preset, so `Config(mode="released")` is released
        everywhere unless a key is set explicitly (an unknown mode is reported by the next step)."""
        for key, value in MODE_DEFAULTS.get(self.mode, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def _validate_strings_and_choices(self) -> None:
        """Names and paths are non-empty strings; enumerated keys hold one of their allowed values."""
        for key in STRING_KEYS:
            self._expect_string(key)
        for key in OPTIONAL_STRING_KEYS:
            self._expect_string(key, none_ok=True)
        self._expect_choice("mode", MODES)
        self._expect_choice("dataset", DATASETS)
        self._expect_choice("depth_sampling", SAMPLING_STRATEGIES)
        self._expect_choice("unprojection", UNPROJECTIONS)
        self._expect_choice("depth_similarity", DEPTH_SIMILARITIES)
        self._expect_choice("centering", CENTERINGS)
        self._expect_choice("lhp_strategy", LHP_STRATEGIES)
        self._expect_choice("amp", AMP_CHOICES)
        self._expect_choice("depth_normalization", ("auto", "none", "minmax", "minmax255"))
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"config key 'device' = {self.device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if isinstance(self.classes, bool) or not (
            (isinstance(self.classes, int) and self.classes >= 2) or self.classes == "world"
        ):
            raise ConfigError(f"config key 'classes' = {self.classes!r}: expected an integer >= 2 or 'world'")

    def _validate_integers(self) -> None:
        """Counts, sizes and intervals are integers in range, and the kNN/sampling counts fit each other."""
        for key, lo in INTEGER_MINIMUM.items():
            self._expect_integer(key, lo, none_ok=key in ("eval_max_images", "threads", "crf_workers"))
        if self.num_neighbors > self.knn_k:
            raise ConfigError(
                f"config key 'num_neighbors' = {self.num_neighbors}: must be <= knn_k = {self.knn_k} "
                "(positives are drawn from the stored kNN ranks 1..num_neighbors)"
            )
        if self.sample_min_side > self.feature_samples:
            raise ConfigError(
                f"config key 'sample_min_side' = {self.sample_min_side}: must be <= feature_samples = "
                f"{self.feature_samples}"
            )

    def _validate_numbers(self) -> None:
        """Rates, weights, shifts and factors are finite numbers in range (integers become floats)."""
        self._expect_number("crop_ratio", 0.0, 1.0, lo_open=True)
        self._expect_number("dropout", 0.0, 1.0)
        if self.dropout >= 1.0:
            raise ConfigError(f"config key 'dropout' = {self.dropout}: expected a probability in [0, 1)")
        self._expect_number("lr", 0.0, lo_open=True)
        self._expect_number("probe_lr", 0.0, lo_open=True)
        self._expect_number("fov_deg", 0.0, 180.0, lo_open=True)
        if self.fov_deg >= 180.0:
            raise ConfigError(f"config key 'fov_deg' = {self.fov_deg}: expected a field of view in (0, 180) degrees")
        for key in ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight", "depth_weight",
                    "lhp_weight", "lhp_depth_weight"):
            self._expect_number(key, 0.0)
        for key in ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift", "depth_shift"):
            self._expect_number(key, -1.0, 1.0)
        self._expect_number("depth_decay_factor", 0.0, 1.0)
        self._expect_number("sample_decay_factor", 0.0, 1.0, lo_open=True)
        self._expect_number("lhp_quantile", 0.0, 1.0, lo_open=True)

    def _validate_flags_and_shapes(self) -> None:
        """Switches are booleans, backbone_kwargs a mapping, world_size a [height, width] list."""
        for key in ("five_crop", "zero_clamp", "use_depth", "fps_random_start", "decay_after_step",
                    "sample_decay_at_start", "lhp", "lhp_weight_balance", "feature_cache", "eval_crf", "eval_flip"):
            self._expect_bool(key)
        if not isinstance(self.backbone_kwargs, dict):
            raise ConfigError(f"config key 'backbone_kwargs' = {self.backbone_kwargs!r}: expected a mapping")
        if (
            not isinstance(self.world_size, (list, tuple))
            or len(self.world_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in self.world_size)
        ):
            raise ConfigError(f"config key 'world_size' = {self.world_size!r}: expected [height, width] >= 16")
        # stored as a list whichever sequence was given (e.g. a tuple from Python code)
        self.world_size = list(self.world_size)

    def _validate_depth_needs(self) -> None:
        """Options that use depth need use_depth=true."""
        if self.depth_sampling == "fps" and not self.use_depth:
            raise ConfigError(
                "config key 'depth_sampling' = 'fps' needs depth: set use_depth=true or depth_sampling=random"
            )
        if self.lhp and self.lhp_strategy == "depth" and not self.use_depth:
            raise ConfigError("config key 'lhp_strategy' = 'depth' needs depth: set use_depth=true")
        if self.unprojection == "camera" and self.mode == "released":
            raise ConfigError("config key 'unprojection' = 'camera': released mode unprojects with the released "
                              "field of view (docs/fidelity.md §3.4); use mode=paper or unprojection=fov")

    def _validate_against_data(self) -> None:
        """What can be checked before any data is prepared, so a run fails in seconds, not after minutes of
        preparation: classes per dataset, sizes against the backbone's patch, the synthetic world's size."""
        allowed = {"cityscapes": (27, 19, "world"), "potsdam": (3, 6), "cocostuff": (27,)}.get(self.dataset)
        if allowed is not None and self.classes not in allowed:
            raise ConfigError(f"config key 'classes' = {self.classes!r}: dataset {self.dataset!r} has "
                              f"{' or '.join(map(repr, allowed))} classes")
        if self.dataset == "directory" and self.classes == "world":
            raise ConfigError("config key 'classes' = 'world': only the cityscapes dataset (the synthetic world) has "
                              "world classes; expected the directory dataset's number of classes")
        patch = backbone_patch_size(self.backbone, self.backbone_kwargs)
        if patch is not None:
            self.check_patch_size(patch)
        if self.lhp and self.lhp_strategy == "attention" and self.feature_cache:
            raise ConfigError("config key 'lhp_strategy' = 'attention' needs the backbone's attention each step: "
                              "set feature_cache=false")
        if self.depth_normalization in ("minmax", "minmax255") and not self.five_crop:
            raise ConfigError(f"config key 'depth_normalization' = {self.depth_normalization!r} needs five-cropped "
                              "data (the parent image's min/max is stored with the crops): set five_crop=true")
        if self.depth_sampling == "fps" and self.depth_source == "none":
            raise ConfigError("config key 'depth_sampling' = 'fps' needs depth: depth_source is 'none'")
        if self.data_dir is None and self.dataset == "cityscapes":  # the synthetic world: sizes known now
            n = self.world_n_train * (5 if self.five_crop else 1)
            if self.batch_size > n:
                raise ConfigError(f"config key 'batch_size' = {self.batch_size}: the synthetic world has {n} training "
                                  f"{'crops' if self.five_crop else 'images'} (world_n_train={self.world_n_train}); "
                                  f"expected at most {n}")
            if self.num_neighbors > n - 1:
                raise ConfigError(f"config key 'num_neighbors' = {self.num_neighbors}: each of the {n} training "
                                  f"{'crops' if self.five_crop else 'images'} has {n - 1} others; expected at most {n - 1}")

    def check_patch_size(self, patch: int) -> None:
        """The sizes against a backbone's patch size: ``res`` and ``eval_res`` are multiples of it, and FPS
        finds its feature_samples x feature_samples cells on the res / patch grid. Validation calls it with
        the size the backbone's name implies; ``depthg.build.build_backbone`` with the loaded model's."""
        for key in ("res", "eval_res"):
            if getattr(self, key) % patch:
                raise ConfigError(f"config key {key!r} = {getattr(self, key)}: expected a multiple of the backbone's "
                                  f"patch size {patch} ({self.backbone})")
        grid = self.res // patch
        if self.depth_sampling == "fps" and self.feature_samples > grid:
            raise ConfigError(
                f"config key 'feature_samples' = {self.feature_samples}: FPS picks feature_samples x "
                f"feature_samples cells of the {grid}x{grid} feature grid (res {self.res} / patch {patch}); "
                f"expected at most {grid}"
            )

    # ---- validation primitives: each raises ConfigError naming the key, its value and what is allowed ---
    def _expect_choice(self, key: str, allowed: tuple) -> None:
        """``key`` holds one of ``allowed``."""
        value = getattr(self, key)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} = {value!r}: expected one of {list(allowed)}")

    def _expect_integer(self, key: str, lo: int, none_ok: bool = False) -> None:
        """``key`` is an integer (not a bool) >= lo, or None where ``none_ok``."""
        value = getattr(self, key)
        if value is None and none_ok:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} = {value!r}: expected an integer")
        if value < lo:
            raise ConfigError(f"config key {key!r} = {value!r}: expected an integer in [{lo}, inf]")

    def _expect_number(self, key: str, lo: float | None = None, hi: float | None = None,
                       lo_open: bool = False) -> None:
        """``key`` is a finite number in [lo, hi] (lo excluded where ``lo_open``); an integer is stored as float."""
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} = {value!r}: expected a number")
        if isinstance(value, int):
            value = float(value)
            setattr(self, key, value)
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r} = {value!r}: expected a finite number")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise ConfigError(
                f"config key {key!r} = {value!r}: expected a number {'>' if lo_open else '>='} {lo}"
            )
        if hi is not None and value > hi:
            raise ConfigError(f"config key {key!r} = {value!r}: expected a number <= {hi}")

    def _expect_bool(self, key: str) -> None:
        """``key`` is true or false (not 0/1)."""
        if not isinstance(getattr(self, key), bool):
            raise ConfigError(f"config key {key!r} = {getattr(self, key)!r}: expected true or false")

    def _expect_string(self, key: str, none_ok: bool = False) -> None:
        """``key`` is a non-empty string, or None where ``none_ok``."""
        value = getattr(self, key)
        if value is None and none_ok:
            return
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config key {key!r} = {value!r}: expected a non-empty string")

    # ---- conversion -----------------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML-serialisable) of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        """Build a Config; unknown keys are an error listing the valid keys and close matches."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(values).__name__}")
        check_keys(values.keys(), source)
        return cls(**values)

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied and validated."""
        check_keys(changes.keys(), "Config.replace")
        return Config(**{**self.to_dict(), **changes})

    def with_mode(self, mode: str) -> "Config":
        """The same run in the other fidelity mode: the mode's defaults (:data:`MODE_DEFAULTS`) replace the
        current ones, and released mode starts FPS at cell 0, as the released code does (:func:`merge_values`).

        Changing only ``mode`` would leave a hybrid (e.g. released mode with the 3D-distance depth term).
        """
        return Config(**merge_values(self.to_dict(), {"mode": mode}))

    def save(self, path: str | Path) -> Path:
        return save_config(self, path)

    # ---- presets ------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, /, mode: str = "paper", **overrides: Any) -> "Config":
        """The configuration of one of the paper's runs (docs/method.md §11) in the given fidelity mode.

        ``cocostuff_vits8``, ``cocostuff_vitb8``, ``cityscapes_vitb8``, ``potsdam_vits8``: the four
        ``paper_reproduction.sh`` runs. ``stego``: the COCO-Stuff ViT-S/8 run with depth off (random
        sampling, no depth term) -- the STEGO baseline under the same loop. ``synthetic``: the embedded
        default sized for a 2-core CPU (docs/method.md §11 says where each value comes from).

        ``overrides`` are config keys (``name=...`` included; ``output_dir`` follows the name unless given).
        """
        check_preset(name)
        if mode not in MODES:
            raise ConfigError(f"preset mode {mode!r}: expected one of {list(MODES)}")
        values = _preset_values(name)
        values.update(_mode_values(mode))
        check_keys(overrides.keys(), f"Config.preset({name!r})")
        values.setdefault("name", f"{name}_{mode}")
        values["output_dir"] = f"runs/{overrides.get('name', values['name'])}"
        values.update(overrides)
        return cls(**values)


#: the patch size of the embedded backbone (depthg/weights/embedded_vit.json: ``vit_small_patch8_224``).
#: Validation uses this constant, so building a Config reads no file; ``depthg.build.build_backbone`` checks
#: the loaded backbone's real patch size against the run's sizes again.
EMBEDDED_PATCH_SIZE = 8


def backbone_patch_size(backbone: str, backbone_kwargs: dict[str, Any] | None = None) -> int | None:
    """The patch size a backbone name implies, without building it or reading a file: ``patch_size`` in
    ``backbone_kwargs``, else ``vit_small_patch8_224`` -> 8, ``vitb16`` -> 16, ``embedded`` ->
    :data:`EMBEDDED_PATCH_SIZE`; None when the name does not say."""
    kwargs = dict(backbone_kwargs or {})
    if isinstance(kwargs.get("patch_size"), int) and not isinstance(kwargs["patch_size"], bool):
        return int(kwargs["patch_size"])
    if backbone == "embedded":
        return EMBEDDED_PATCH_SIZE
    match = re.search(r"patch(\d+)", backbone) or re.fullmatch(r"vit[a-z](\d+)", backbone.lower())
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------------
#: The released default config's values, shared by the four released runs and the synthetic default.
_BASE: dict[str, Any] = dict(
    res=224, eval_res=320, five_crop=True, crop_ratio=0.5, lr=5e-4, probe_lr=5e-3,
    steps=RELEASED_ITERATIONS, batch_size=32, neg_samples=5, num_neighbors=7, knn_k=30,
    zero_clamp=True, dropout=0.1, extra_clusters=0, use_depth=True, depth_source="zoedepth",
    fov_deg=90.0, lhp=False, seed=0, sample_min_side=1, eval_crf=True, eval_flip=True,
    feature_samples=11, sample_decay_factor=1.0, sample_decay_every=0,
    eval_every=100, checkpoint_every=100, centering="released", depth_sampling="fps",
    num_workers=8,  # the released runs' loader workers; here also the threads reading training crops
)
#: The Cityscapes run's loss weights and shifts (the synthetic default uses them too).
_CITYSCAPES_LOSS: dict[str, Any] = dict(
    pos_intra_weight=0.95, pos_intra_shift=0.39,
    pos_inter_weight=1.02, pos_inter_shift=0.25,
    neg_inter_weight=0.5700000000000001, neg_inter_shift=0.26,
    depth_weight=0.09, depth_shift=0.03, depth_decay_factor=0.8,
)


def _preset_values(name: str) -> dict[str, Any]:
    """Hyper-parameters of each preset; decay intervals in iterations (the script's global steps converted)."""
    if name in ("cocostuff_vits8", "stego"):
        values = dict(
            _BASE, dataset="cocostuff", classes=27, backbone="vit_small_patch8_224", dim=70,
            sample_decay_factor=0.9, sample_decay_every=1000,
            pos_intra_weight=0.58, pos_intra_shift=0.07,
            pos_inter_weight=0.36, pos_inter_shift=0.025,
            neg_inter_weight=0.7000000000000001, neg_inter_shift=0.761,
            depth_weight=0.19, depth_shift=0.03, depth_decay_factor=0.6, depth_decay_every=250,
        )
        if name == "stego":
            # Same loop and STEGO weights, depth off: random sampling, no depth term, no sample decay.
            values.update(use_depth=False, depth_sampling="random", depth_weight=0.0,
                          sample_decay_factor=1.0, sample_decay_every=0, depth_decay_factor=1.0,
                          depth_decay_every=0)
        return _released_run(values)
    if name == "cocostuff_vitb8":
        return _released_run(dict(
            _BASE, dataset="cocostuff", classes=27, backbone="vit_base_patch8_224", dim=90,
            eval_every=50, checkpoint_every=50, feature_samples=12, sample_decay_every=1000,
            # these six to 7 significant digits; the depth pair in the script's full precision.
            pos_intra_weight=0.2305237, pos_intra_shift=0.1232631,
            pos_inter_weight=1.0500945, pos_inter_shift=0.2102829,
            neg_inter_weight=0.2485038, neg_inter_shift=0.9748103,
            depth_weight=0.16026274975444096, depth_shift=0.035909146298813595,
            depth_decay_factor=0.64, depth_decay_every=300,
        ))
    if name == "cityscapes_vitb8":
        return _released_run(dict(
            _BASE, **_CITYSCAPES_LOSS, dataset="cityscapes", classes=27, backbone="vit_base_patch8_224", dim=100,
            centering="none", depth_sampling="random", depth_decay_every=400,
        ))
    if name == "potsdam_vits8":
        return _released_run(dict(
            _BASE, dataset="potsdam", classes=3, backbone="vit_small_patch8_224", dim=90, batch_size=16,
            five_crop=False,
            pos_intra_weight=0.61, pos_intra_shift=0.20,
            pos_inter_weight=0.34, pos_inter_shift=0.09,
            neg_inter_weight=0.72, neg_inter_shift=0.63,
            depth_weight=0.13, depth_shift=0.14, depth_decay_factor=1.0, depth_decay_every=200,
        ))
    if name == "synthetic":
        return _synthetic_values()
    raise AssertionError(name)  # unreachable: names checked by Config.preset


def _released_run(values: dict[str, Any]) -> dict[str, Any]:
    """A released run's values with its decay intervals, given in global steps, in iterations."""
    return dict(values, depth_decay_every=global_steps_to_iterations(values["depth_decay_every"]),
                sample_decay_every=global_steps_to_iterations(values["sample_decay_every"]))


#: The synthetic preset's shifts: ``python -m depthg calibrate --preset synthetic`` on the development world
#: (world seed 0) with the embedded backbone, every shift the 0.9 quantile of the random-pair correlations
#: (depthg.calibrate; docs/method.md §3.5, §11).
SYNTHETIC_SHIFT = 0.475


def _synthetic_values() -> dict[str, Any]:
    """The embedded default: the synthetic street world on a 2-core CPU in minutes, with the Cityscapes
    run's loss weights, calibrated shifts and training images at the evaluation scale; where each value comes
    from is in docs/method.md §11."""
    steps = 300
    shifts = dict(pos_intra_shift=SYNTHETIC_SHIFT, pos_inter_shift=SYNTHETIC_SHIFT, neg_inter_shift=SYNTHETIC_SHIFT)
    return dict(
        _BASE, **{**_CITYSCAPES_LOSS, **shifts}, dataset="cityscapes", data_dir=None, classes="world",
        depth_source="gt", backbone="embedded", weights=None, res=128, eval_res=128, dim=32, batch_size=16,
        steps=steps, centering="none", feature_samples=8, depth_decay_every=round(400 * steps / RELEASED_ITERATIONS),
        five_crop=False, feature_cache=True, eval_batch_size=16, eval_crf=False,
        world_n_train=240, world_n_val=16, world_size=[256, 512], log_every=10, threads=1, num_workers=0,
    )


def _mode_values(mode: str) -> dict[str, Any]:
    """What a preset in ``mode`` sets on top of its hyper-parameters (module docstring)."""
    out: dict[str, Any] = {"mode": mode, **MODE_DEFAULTS[mode]}
    if mode == "released":
        out["fps_random_start"] = False  # the released FPS always starts at cell 0 (docs/fidelity.md §3.5)
    return out


# ----------------------------------------------------------------------------------------------------
# files and overrides
# ----------------------------------------------------------------------------------------------------
def check_keys(keys: Any, source: str) -> None:
    """Error listing unknown keys, close matches and the valid keys."""
    valid = Config.keys()
    unknown = [k for k in keys if k not in valid]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), valid, n=3)
        hints.append(f"{key!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
    raise ConfigError(f"{source}: unknown config key(s) {', '.join(hints)}. Valid keys: {', '.join(valid)}")


#: the most values a YAML config file (or an override) may hold once its aliases are expanded: a "billion
#: laughs" file of a few hundred bytes, whose aliases repeat aliases, would otherwise expand to gigabytes
MAX_YAML_VALUES = 10_000
#: the deepest nesting of lists and mappings a YAML value may have
MAX_YAML_DEPTH = 50


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses, with a :class:`ConfigError` naming ``where``: a document that expands to
    more than :data:`MAX_YAML_VALUES` values (aliases are counted each time they are used; the document is
    composed, not expanded, to count them), a recursive alias, nesting deeper than :data:`MAX_YAML_DEPTH`, and a
    mapping that gives a key twice (YAML would silently keep the second)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_values(node, where, {}, ())
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from None
    finally:
        loader.dispose()


def _count_values(node: yaml.Node, where: str, counted: dict[int, int], path: tuple[int, ...]) -> int:
    """The number of values ``node`` expands to (aliases included each time), checking duplicated keys."""
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in path:
        raise ConfigError(f"{where}: a YAML alias refers to itself (line {node.start_mark.line + 1}); refusing to read it")
    if len(path) > MAX_YAML_DEPTH:
        raise ConfigError(f"{where}: the YAML is nested deeper than {MAX_YAML_DEPTH} levels; refusing to read it")
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            name = (key.tag, key.value) if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in seen:
                raise ConfigError(f"{where}: the key {key.value!r} is given twice (lines {seen[name] + 1} and "
                                  f"{key.start_mark.line + 1}); keep one")
            if name is not None:
                seen[name] = key.start_mark.line
            children += [key, value]
    total = 1
    for child in children:
        total += _count_values(child, where, counted, (*path, id(node)))
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_YAML_VALUES} values (aliases that repeat "
                              "aliases?); refusing to read it")
    counted[id(node)] = total
    return total


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The values of a YAML (``.yaml``/``.yml``) or JSON (``.json``) config file, keys checked but values not
    yet validated: a file may hold part of a config that overrides complete (:func:`load_config`). A key given
    twice, or a YAML file that expands beyond a small size (:func:`load_yaml`), is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        values = read_json_strict(text, f"config file {path}") if path.suffix == ".json" else \
            load_yaml(text, f"config file {path}")
    except DepthGError as err:
        raise ConfigError(str(err)) from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    check_keys(values.keys(), str(path))
    return values


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config of a file with ``["key=value", ...]`` overrides on top, validated once, as merged: a file
    that is valid only with its overrides (``use_depth: false`` + ``depth_sampling=random``) is accepted."""
    values = merge_values(read_config_file(path), parse_overrides(overrides))
    return Config.from_dict(values, source=str(path))


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the config as YAML or JSON (by suffix), atomically."""
    path = Path(path)
    if path.suffix == ".json":
        text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    elif path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    else:
        raise ConfigError(f"config path {path}: expected a .yaml, .yml or .json suffix")
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return path


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: value}``, values parsed with ``yaml.safe_load``, keys checked.

    ``steps=500``, ``weights=null``, ``backbone_kwargs={embed_dim: 32}``, ``data_dir=/data/cityscapes``.
    """
    changes: dict[str, Any] = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = load_yaml(raw, f"the value of override {item!r}") if raw.strip() else None
        # YAML 1.1 reads "1e-3" (no dot) as a string; numbers are meant there.
        if isinstance(value, str):
            try:
                value = float(value) if any(ch in value for ch in ".eE") else int(value)
            except ValueError:
                pass
        # Strings that YAML reads as other types but the field wants as text (e.g. name=123).
        if key in STRING_KEYS + OPTIONAL_STRING_KEYS and value is not None:
            value = raw.strip() if not isinstance(value, str) else value
        changes[key] = value
    check_keys(changes.keys(), "overrides")
    return changes


def merge_values(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``values`` with ``changes`` on top, not validated. A change of ``mode`` is applied first and converts
    the keys that depend on it (:data:`MODE_DEFAULTS`; released mode also starts FPS at cell 0), then the
    other changes, so ``mode=released depth_similarity=product`` keeps the explicit similarity."""
    merged, rest = dict(values), dict(changes)
    if "mode" in rest:
        mode = rest.pop("mode")
        if mode not in MODES:
            raise ConfigError(f"config key 'mode' = {mode!r}: expected one of {list(MODES)}")
        if mode != merged.get("mode", Config.mode):
            merged.update({key: None for key in MODE_DEFAULTS[mode]})
            merged.update(_mode_values(mode))
    merged.update(rest)
    return merged


def check_value(key: str, value: Any) -> Any:
    """``value`` for the config key ``key``, checked by the config's own validators of single keys (strings,
    choices, integers, numbers, flags, shapes; not the checks that need a whole run: data, patch size) as the
    config would store it. A string for a key that is not text is read as the CLI reads ``key=value``
    (:func:`parse_overrides`), so ``"false"`` is false and ``"2.7"`` is not an integer."""
    if isinstance(value, str) and key not in STRING_KEYS + OPTIONAL_STRING_KEYS:
        value = parse_overrides([f"{key}={value}"])[key]
    check_keys([key], "check_value")
    probe = object.__new__(Config)  # the defaults with this one value, validated without building a run
    probe.__dict__.update({**Config().to_dict(), key: value})
    for step in (probe._validate_strings_and_choices, probe._validate_integers, probe._validate_numbers,
                 probe._validate_flags_and_shapes):
        step()
    return getattr(probe, key)


def check_preset(name: Any) -> str:
    """``name`` if it is a preset, else a :class:`ConfigError` with the close matches and the presets."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; available presets: {list(PRESETS)}")
    return name


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """``cfg`` with ``["key=value", ...]`` applied (:func:`parse_overrides`, :func:`merge_values`), validated once."""
    return Config(**merge_values(cfg.to_dict(), parse_overrides(overrides)))
