"""Every config in conf/ and recipes/ composes, and what it names can be built (model, grid, sampler)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import cli, explain
from sortedcli.build import build_grid, build_model, build_optimizer, build_sampler
from sortedcli.data import input_spec
from sortedcli.cli import CONF_DIR, RECIPES_DIR, VERBS, translate
from sortedcli.data.vision import BUILDERS
from sortedcli.errors import UsageError
from sortedcli.models import REGISTRY

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
SEARCHPATH = f"hydra.searchpath=[file://{CONF_DIR.resolve()}]"


def conf(name: str, overrides=()):
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def recipe(name: str, overrides=()):
    """A recipe composed as `sortednet train --recipe NAME` does: recipes/ is the primary config
    dir and conf/ is on the search path (where `defaults: [train]` and the groups come from)."""
    with initialize_config_dir(config_dir=str(RECIPES_DIR.resolve()), version_base="1.3"):
        return compose(config_name=name, overrides=[SEARCHPATH, *overrides])


def group_override(group: str, option: str) -> str:
    return f"dims=[{option}]" if group == "dims" else f"{group}={option}"


def test_the_config_tree_is_there():
    assert {"model", "data", "dims", "sampler", "optim", "trainer", "eval"} <= set(GROUPS)
    assert set(VERBS) <= set(PRIMARY), "every verb is a Hydra app with conf/<verb>.yaml"
    assert {"default", "fmnist_resnet50_160", "fmnist_resnet50_full", "fmnist_mobilenet_v2",
            "fmnist_mobilenet_v2_pretrained", "cifar10_mobilenet_v2"} <= set(RECIPES)
    assert set(REGISTRY) == {o for g, o in OPTIONS if g == "model"}  # one config per registered model


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    cfg = conf("train", [group_override(group, option)])
    section = cfg[group]
    own = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    if group == "dims":  # a list group: the option's file is one entry of the dims mapping
        assert list(section) == [option] and list(own) == [option]
    # the option's own keys came through (??? stays missing: not an error until it is read)
    assert set(own.keys()) - {"defaults"} <= set(section.keys())  # (defaults: an option extending another)
    if "name" in own:
        assert section.name == own.name
    # the groups that `sortednet submodels` has compose there too
    if group in ("model", "data", "dims"):
        assert conf("submodels", [group_override(group, option)])[group] == section


@pytest.mark.parametrize("name", PRIMARY)
def test_every_primary_config_composes(name):
    cfg = conf(name)
    if name in ("train", "submodels"):
        assert {"model", "data", "dims"} <= set(cfg)
        assert cfg.model.name in REGISTRY and cfg.data.name in BUILDERS  # defaults that exist
        assert set(cfg.dims) == {"width", "depth"}
    if name in ("train", "eval", "export"):
        assert set(cfg.eval) >= {"batch_size", "calib_batches", "calib_batch_size", "test_subset"}
        assert cfg.paths.runs == "runs"
    if name == "export":
        assert OmegaConf.is_missing(cfg, "budget")  # --budget is mandatory
    if name == "eval":
        assert cfg.all_submodels is False and cfg.ckpt is None


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_and_builds(name):
    cfg = recipe(name)
    base = conf("train")
    assert set(base) <= set(cfg), "a recipe builds on conf/train.yaml"
    brought = OmegaConf.is_missing(cfg.model, "pretrained") or (
        cfg.model.get("pretrained") and not Path(cfg.model.pretrained).exists()  # a hub id: not offline
        or str(cfg.model.get("pretrained")).endswith(".gguf"))  # a real 135M+ model: not in the default run
    if brought or (cfg.model.get("config", 1) is None and not cfg.model.get("pretrained")):
        # weights the user brings (a recipe may state their architecture too, for `sortednet plan`: 13B):
        # a stand-in as deep as the recipe's deepest exit
        levels = OmegaConf.to_container(cfg).get("dims", {}).get("depth", {}).get("levels")
        cfg.model.pretrained = None
        cfg.model.config = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100,
                            "num_hidden_layers": max(levels) if isinstance(levels, list) else 12}
    model = build_model(cfg, input_spec(cfg.data)[0])
    grid = build_grid(cfg, model)
    assert len(grid) == len(list(grid)) > 1
    if cfg.model.name == "resnet50":
        assert len(grid) == 160
    build_sampler(cfg, grid)
    build_optimizer(cfg, model)
    # the header comment's "= N sub-models", when it states one, is what the recipe builds
    stated = re.search(r"=\s*(\d+)\s+sub-models", (RECIPES_DIR / f"{name}.yaml").read_text())
    if stated:
        assert len(grid) == int(stated.group(1))


def test_full_baseline_recipe_differs_from_the_sorted_one_only_in_the_sampler():
    if not {"fmnist_resnet50_160", "fmnist_resnet50_full"} <= set(RECIPES):
        pytest.skip("the ResNet-50 recipes are not there")
    sorted_cfg = OmegaConf.to_container(recipe("fmnist_resnet50_160"), resolve=True)
    full_cfg = OmegaConf.to_container(recipe("fmnist_resnet50_full"), resolve=True)
    assert sorted_cfg.pop("sampler")["name"] == "sortednet"
    assert full_cfg.pop("sampler")["name"] == "full"
    assert full_cfg == sorted_cfg


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_flag_composes_the_same_config_through_the_cli(name, tmp_path):
    """`sortednet train --recipe NAME --cfg job` prints the config this file composes (the CLI's
    wiring of --recipe: recipes/ as primary config dir, conf/ on the search path)."""
    args = translate("train", ["--recipe", name])
    assert args[args.index("--config-name") + 1] == name
    p = cli(["train", "--recipe", name, "--cfg", "job"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert yaml.safe_load(p.stdout) == OmegaConf.to_container(recipe(name))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name,n", [("resnet_tiny", 4), ("resnet18", 8), ("resnet34", 16), ("resnet50", 16),
                                    ("mobilenet_v2", 10), ("mobilenet_tiny", 3)])
def test_every_model_builds_with_the_default_grid(name, n):
    cfg = conf("train", [f"model={name}"])
    model = build_model(cfg, {"num_classes": 10, "in_channels": 1})
    grid = build_grid(cfg, model)
    assert [d.name for d in grid.dims] == ["width", "depth"]
    assert grid.dims[1].levels == tuple(range(1, n + 1))  # depth: levels 'all' = 1..number of blocks
    assert len(grid) == 10 * n


@pytest.mark.parametrize("sampler", [o for g, o in OPTIONS if g == "sampler"])
@pytest.mark.parametrize("optim", [o for g, o in OPTIONS if g == "optim"])
def test_every_sampler_and_optimizer_builds(sampler, optim):
    cfg = conf("train", ["model=resnet_tiny", f"sampler={sampler}", f"optim={optim}"])
    model = build_model(cfg, {"num_classes": 10, "in_channels": 1})
    grid = build_grid(cfg, model)
    s = build_sampler(cfg, grid)
    assert all(sub in set(grid) for sub in s.step())
    build_optimizer(cfg, model)


@pytest.mark.parametrize("dims,match", [
    ({"heads": {"levels": [1, 2]}}, "cannot be sorted along 'heads'"),
    ({"width": {"levels": [0.5, 1.5]}}, "fractions in"),
    ({"width": {"levels": []}}, "fractions in"),
    ({"depth": {"levels": [0, 1]}}, "integers in 1..4"),
    ({"depth": {"levels": [1, 5]}}, "integers in 1..4"),
    ({"depth": {"levels": "some"}}, "integers in 1..4"),
    ({}, "no sorted dims"),
])
def test_build_grid_rejects_bad_dims(dims, match):
    cfg = OmegaConf.create({"model": {"name": "resnet_tiny", "small_stem": True, "weights": None},
                            "dims": dims})
    model = build_model(cfg, {"num_classes": 10, "in_channels": 1})
    with pytest.raises(UsageError, match=re.escape(match)):
        build_grid(cfg, model)


def test_build_grid_accepts_a_dim_the_model_supports_alone():
    cfg = conf("train", ["model=resnet_tiny", "dims=[width]", "dims.width.levels=[0.5,1.0,0.5]"])
    grid = build_grid(cfg, build_model(cfg, {"num_classes": 10, "in_channels": 1}))
    assert [d.name for d in grid.dims] == ["width"] and grid.dims[0].levels == (0.5, 1.0)
    assert len(grid) == 2


def test_pretrained_recipe_baselines_are_one_override_away():
    """The baselines of the pretrained MobileNetV2 recipe: sampler=full (unsorted, sliced after),
    model.importance=none (sorted without importance sorting), US-Nets (sandwich + distillation)."""
    cfg = recipe("fmnist_mobilenet_v2_pretrained")
    assert cfg.model.weights == "IMAGENET1K_V1" and cfg.model.importance == "l1"
    model = build_model(cfg, {"num_classes": 10, "in_channels": 1})
    grid = build_grid(cfg, model)
    full = recipe("fmnist_mobilenet_v2_pretrained", ["sampler=full", "~sampler.g"])
    assert build_sampler(full, grid).name == "full"
    assert recipe("fmnist_mobilenet_v2_pretrained", ["model.importance=none"]).model.importance == "none"
    us = recipe("fmnist_mobilenet_v2_pretrained", ["sampler=sandwich", "~sampler.g", "distill.enabled=true"])
    assert build_sampler(us, grid).name == "sandwich" and us.distill.enabled is True


@pytest.mark.parametrize("override,match", [
    ("trainer.batch_size=-1", "trainer.batch_size must be an integer >= 1, got -1"),
    ("trainer.epochs=-3", "trainer.epochs must be an integer >= 1"),
    ("trainer.max_steps=-1", "trainer.max_steps must be null or an integer >= 0"),
    ("optim.lr=abc", "optim.lr must be a number > 0, got 'abc'"),
    ("optim.weight_decay=-1", "optim.weight_decay must be a number >= 0"),
    ("eval.calib_batches=0", "eval.calib_batches must be an integer >= 1"),
    ("distill.alpha=2", "distill.alpha must be a number in [0, 1]"),
    ("trainer.tensorboard=maybe", "trainer.tensorboard must be true or false"),
])
def test_check_settings_refuses_impossible_or_mistyped_values(override, match):
    from sortedcli.build import check_settings

    check_settings(conf("train"))  # the defaults pass
    with pytest.raises(UsageError, match=re.escape(match)):
        check_settings(conf("train", [override]))
