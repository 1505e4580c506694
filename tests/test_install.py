"""The install is complete: every dependency the library and the notebooks use imports, and the three
places that pin versions (requirements.txt, pyproject.toml, environment.yml) agree."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# module imported -> distribution that provides it
MODULES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "numpy": "numpy",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub",
    "filelock": "filelock",
    "transformers": "transformers",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "cv2": "opencv-python-headless",
    "cityscapesscripts.helpers.labels": "cityscapesscripts",
    "matplotlib": "matplotlib",
    "plotly": "plotly",
    "ipywidgets": "ipywidgets",
    "jupyterlab": "jupyterlab",
    "ipykernel": "ipykernel",
    "nbformat": "nbformat",
    "nbclient": "nbclient",
    "papermill": "papermill",
    "open3d": "open3d-cpu",
    "pydensecrf.densecrf": "pydensecrf2",
    "faiss": "faiss-cpu",
    "numba": "numba",
    "playwright.sync_api": "playwright",
}


def _pins_requirements() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _parse(spec: str) -> tuple[str, str]:
    name, version = spec.split("==")
    return name.strip().lower(), version.strip()


def _pins_pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    return dict(_parse(s) for s in specs)


def _pins_environment() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return dict(_parse(s) for s in pip_section)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependency_imports(module: str) -> None:
    importlib.import_module(module)


def test_pins_agree_and_are_installed() -> None:
    req, pyproj, env = _pins_requirements(), _pins_pyproject(), _pins_environment()
    assert req == pyproj, f"requirements.txt and pyproject.toml differ: {set(req.items()) ^ set(pyproj.items())}"
    assert req == env, f"requirements.txt and environment.yml differ: {set(req.items()) ^ set(env.items())}"
    for dist in MODULES.values():
        assert dist in req, f"{dist} is imported by the workbench but not pinned"
    for name, version in req.items():
        installed = metadata.version(name)
        assert re.sub(r"\+.*", "", installed) == version, f"{name}: pinned {version}, installed {installed}"


def test_torch_pair_is_the_pinned_one() -> None:
    import torch
    import torchvision

    assert torch.__version__.split("+")[0] == "2.14.1"
    assert torchvision.__version__.split("+")[0] == "0.29.1"


def test_cli_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "depthg", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for command in ("synthesize", "depth", "crop", "knn", "train", "eval"):
        assert command in out.stdout
