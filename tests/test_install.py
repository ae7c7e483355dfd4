"""A real install: the wheel built from this source tree (``pip wheel``, not an editable install) holds
every module, config and recipe, and the installed package trains a recipe from a folder outside the
repository. Offline and fast: no build isolation, no dependencies (they come from the running venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import TINY_EVAL, explain, run_folders

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("pyproject.toml", "README.md", "sortedcli", "conf", "recipes")


def _pip(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the source tree (so the build's own folders land in tmp, not the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SHIPPED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    p = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(src), cwd=root)
    assert p.returncode == 0, explain(p)
    wheels = list((root / "dist").glob("sortednet-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_holds_every_module_config_and_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p.relative_to(REPO).as_posix() for p in (REPO / "sortedcli").rglob("*.py")}
    wanted |= {"sortedcli/" + p.relative_to(REPO).as_posix() for folder in ("conf", "recipes")
               for p in (REPO / folder).rglob("*.yaml")}
    assert {"sortedcli/conf/train.yaml", "sortedcli/conf/model/resnet_tiny.yaml",
            "sortedcli/recipes/digits_tiny.yaml"} <= wanted
    assert sorted(wanted - names) == []
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_wheel_trains_a_recipe_from_another_folder(wheel, tmp_path):
    scratch, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = _pip("install", "--no-deps", "--no-index", "--target", str(scratch), str(wheel), cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    env = {k: v for k, v in os.environ.items() if k not in ("SORTEDNET_CONF", "SORTEDNET_RECIPES", "HYDRA_FULL_ERROR")}
    env.update(PYTHONPATH=str(scratch), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SORTEDNET_CACHE=str(tmp_path / "cache"))

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    p = run("-c", "import sortedcli, sortedcli.cli as c; print(sortedcli.__file__); print(c.CONF_DIR); print(c.RECIPES_DIR)")
    assert p.returncode == 0, explain(p)
    module, conf, recipes = (Path(line) for line in p.stdout.split())
    assert module == scratch / "sortedcli" / "__init__.py"
    assert (conf, recipes) == (scratch / "sortedcli" / "conf", scratch / "sortedcli" / "recipes")

    p = subprocess.run([scratch / "bin" / "sortednet", "submodels", "model=resnet_tiny"], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)  # the console script, the primary configs
    assert p.returncode == 0 and "sub-models" in p.stdout, explain(p)
    p = run("-m", "sortedcli.cli", "train", "--recipe", "nope")  # the recipes are there to be listed
    assert p.returncode == 2 and "digits_tiny" in p.stderr and "default" in p.stderr, explain(p)
    p = run("-m", "sortedcli.cli", "train", "--recipe", "digits_tiny", "trainer.epochs=1", "data.train_subset=128",
            "data.test_subset=32", "dims.width.levels=[0.5,1.0]", *TINY_EVAL)
    assert p.returncode == 0, explain(p)
    runs = run_folders(elsewhere / "runs")
    assert len(runs) == 1 and (runs[0] / "config.yaml").is_file(), explain(p)
    assert not (elsewhere / "data").exists()
