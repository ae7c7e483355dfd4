"""More of a new user's mistakes (issue 23): values of the wrong type that changed a run's meaning, a
recipe silently dropped, numbers the CLI turned into raw Python text; and what is capped rather than
refused (``sampler.g`` above the grid's size, ``generate --max-tokens`` beyond the model's context).

The mistake cases run as those of ``test_mistakes.py`` do: each in a fresh folder, concurrently, and
each must end with one line ``sortednet: error: ...``, exit status 2 and nothing written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest

from conftest import CLI_ENV, TINY, TINY_EVAL, TINY_GRID, cli, explain, run_folders, selected_cases
from test_mistakes import lm_home, snapshot  # noqa: F401  (lm_home: a fixture, one tiny LLaMA run)

OFFLINE = {**CLI_ENV, "HF_HUB_OFFLINE": "1"}
ROOT = Path(__file__).resolve().parents[1]

# id: (args, home, fragment of the one line)    home: "empty" or "run" (a copy of the tiny trained run)
CASES = {
    # a sampler's values are checked against its constructor's types: bool(largest) made "flase" true
    "sampler-largest-flase": (["train", *TINY, "sampler.largest=flase"], "empty",
                              "sampler.largest must be true or false, got 'flase'"),
    "sampler-largest-maybe": (["train", *TINY, "sampler.largest=maybe"], "empty",
                              "sampler.largest must be true or false, got 'maybe'"),
    "sampler-largest-number": (["train", *TINY, "sampler.largest=1"], "empty", "sampler.largest must be true or false"),
    "sampler-power-abc": (["train", *TINY, "sampler.power=abc"], "empty", "sampler.power must be a number, got 'abc'"),
    "sampler-g-fraction": (["train", *TINY, "sampler.g=1.5"], "empty", "sampler.g must be an integer, got 1.5"),
    "sampler-floor-abc": (["train", *TINY, "sampler=lossaware", "sampler.floor=abc"], "empty",
                          "sampler.floor must be a number, got 'abc'"),
    "sampler-all-exits-yes": (["train", *TINY, "sampler=sortednet", "sampler.all_exits=yes"], "empty",
                              "sampler.all_exits must be true or false, got 'yes'"),
    "sampler-sandwich-n-abc": (["train", *TINY, "sampler=sandwich", "sampler.n=abc"], "empty",
                               "sampler.n must be an integer, got 'abc'"),
    # the recipe's sampler.g stays when the sampler is switched: name the key and how to drop it
    "recipe-sampler-full-keeps-g": (["train", "--recipe", "fmnist_mobilenet_v2_pretrained", "sampler=full"], "empty",
                                    "drop it with '~sampler.g'"),
    # a data switch (true or false in conf/data/) was read for its truth: "flase" and 1 were true
    "data-download-flase": (["train", *TINY, "data.download=flase"], "empty",
                            "data.download must be true or false (as its default in data/digits.yaml), got 'flase'"),
    "data-download-1": (["train", *TINY, "data.download=1"], "empty", "data.download must be true or false"),
    "data-raw-flase": (["train", "model=llama_tiny", "data=alpaca", "data.raw=flase"], "empty",
                       "data.raw must be true or false"),
    "two-recipes": (["train", "--recipe", "default", "--recipe", "digits_tiny"], "empty",
                    "--recipe given 2 times (default, digits_tiny)"),
    "generate-exit-abc": (["generate", "--exit", "abc", "hello"], "empty", "--exit must be a number of layers"),
    "generate-max-tokens-abc": (["generate", "--max-tokens", "lots", "hello"], "empty", "--max-tokens must be"),
    "generate-max-tokens-0": (["generate", "--max-tokens", "0", "hello"], "empty", "--max-tokens must be"),
    "generate-temperature-abc": (["generate", "--temperature", "hot", "hello"], "empty", "--temperature must be"),
    "eval-latency-reps-0": (["eval", "--all-submodels", *TINY_EVAL, "eval.latency.reps=0"], "run",
                            "eval.latency.reps must be an integer >= 1"),
    "eval-latency-warmup-abc": (["eval", *TINY_EVAL, "eval.latency.warmup=abc"], "run",
                                "eval.latency.warmup must be an integer >= 0"),
    "train-latency-reps-0": (["train", *TINY, "eval.latency.reps=0"], "empty", "eval.latency.reps must be"),
}


def _cli(args, cwd, env=OFFLINE):
    return cli(args, cwd, env=env)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Every selected case, run concurrently: ``{case: (process, files before, files after)}``."""
    wanted, run = selected_cases(request, __name__, CASES)

    def one(case):
        home = tmp_path_factory.mktemp(case)
        args, kind, _ = CASES[case]
        if kind == "run":
            shutil.copytree(run, home / "runs" / run.name)
        before = snapshot(home)
        p = _cli(args, home)
        return p, before, snapshot(home)

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(wanted, pool.map(one, wanted)))


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line_exit_2_and_writes_nothing(case, outcomes):
    p, before, after = outcomes[case]
    assert p.returncode == 2, explain(p)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: "), explain(p)
    assert "Traceback" not in p.stderr and CASES[case][2] in lines[0], explain(p)
    assert after == before, sorted(set(after) ^ set(before))


def test_every_option_of_every_sampler_is_checked_against_its_constructor():
    """One schema: each sampler's constructor (names, annotated types, defaults). Its defaults pass, a
    word in place of any of its values is refused naming the key, and a key it lacks is refused with
    the '~sampler.KEY' that drops it."""
    from sortedcli.sampling import SAMPLERS, check_options, options_of

    assert options_of("weighted") == {"g": ("int", 1), "power": ("float", -1.0), "largest": ("bool", False)}
    for name in SAMPLERS:
        options = options_of(name)
        check_options(name, {key: default for key, (_, default) in options.items()})
        for key in options:
            with pytest.raises(ValueError, match=rf"sampler\.{key} must be .*, got 'abc'"):
                check_options(name, {key: "abc"})
    with pytest.raises(ValueError, match="takes no setting g .*'~sampler.g'"):
        check_options("full", {"g": 2})


def test_every_recipe_and_data_option_passes_the_schemas_it_is_checked_against():
    """No false refusal: each shipped recipe, and the default config with each data option, composed as
    `train` composes it, passes the sampler's schema and the data options' types."""
    from hydra import compose, initialize_config_dir

    from sortedcli.cli import CONF_DIR, RECIPES_DIR
    from sortedcli.sampling import check_options
    from sortedcli.strict import check_group_types

    searchpath = f"hydra.searchpath=[file://{CONF_DIR.resolve()}]"
    configs = []
    with initialize_config_dir(config_dir=str(RECIPES_DIR.resolve()), version_base="1.3"):
        configs += [compose(config_name=p.stem, overrides=[searchpath], return_hydra_config=True)
                    for p in sorted(RECIPES_DIR.glob("*.yaml"))]
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        configs += [compose(config_name="train", overrides=[f"data={p.stem}"], return_hydra_config=True)
                    for p in sorted((CONF_DIR / "data").glob("*.yaml"))]
    assert len(configs) > 20
    for cfg in configs:
        check_group_types(cfg, "data", cfg.hydra.runtime.choices.data, CONF_DIR)
        options = {k: v for k, v in cfg.sampler.items() if k != "name"}
        check_options(cfg.sampler.name, options)


def test_sampler_g_above_the_grid_draws_the_grid_size_and_says_so(tmp_path):
    """``sampler.g=1000`` on a 12 sub-model grid: 12 drawn per step (not 1000 forwards), said once."""
    from sortedcli.nest import COUNT, FRACTION, Dim, Grid
    from sortedcli.sampling import create_sampler

    grid = Grid((Dim("width", FRACTION, (0.5, 1.0)), Dim("depth", COUNT, (1, 2))))
    for name in ("sortednet", "weighted", "lossaware", "progressive"):
        s = create_sampler(name, grid, g=1000)
        assert s.g == 4 and s.notes == ["sampler.g=1000 is more than the 4 sub-models of the grid: 4 are drawn "
                                        "per step (sampler=all trains every one of them each step)"], (name, s.notes)
    assert create_sampler("sortednet", grid, g=4).notes == []

    p = cli(["train", *TINY, "sampler=sortednet", "sampler.g=1000", "trainer.max_steps=1"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert f"sampler.g=1000 is more than the {TINY_GRID} sub-models of the grid" in " ".join(p.stdout.split()), \
        explain(p)


def test_version_is_the_installed_package_version(tmp_path):
    want = f"sortednet {metadata.version('sortednet')}"
    for args in (["--version"], ["train", "--version"]):
        p = cli(args, cwd=tmp_path)
        assert p.returncode == 0 and p.stdout.strip() == want, explain(p)
    assert not list(tmp_path.iterdir())


def test_generate_keeps_prompt_and_answer_within_the_models_context(lm_home):  # noqa: F811
    """llama_tiny has 512 positions: a longer prompt is refused in one line; ``--max-tokens 100000``
    is capped at what the context leaves after the prompt, with a note."""
    p = cli(["generate", "--raw", "the cat sat on the mat " * 200], cwd=lm_home)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, explain(p)
    assert "the model's context is 512 positions: shorten the prompt" in lines[0], explain(p)

    p = cli(["generate", "--raw", "--max-tokens", "100000", "The cat"], cwd=lm_home)
    assert p.returncode == 0, explain(p)
    note = " ".join(p.stderr.split())
    assert "--max-tokens 100000 capped at" in note and "context of 512 positions" in note, explain(p)
    made = int(note.split(" tokens in ")[0].split()[-1])  # "N tokens in 1.23s (...)"
    capped = int(note.split("capped at ")[1].split(":")[0])
    assert made <= capped < 512, explain(p)


def test_startup_benchmark_reads_the_grid_size_whatever_the_wording():
    """benchmarks/startup.py wanted the text "160 sub-models." and `submodels` came to print "160
    distinct sub-models.": it reads the count instead, from the wordings there were and are."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import startup
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert startup.submodel_count("160 sub-models. FLOPs = ...") == 160
    assert startup.submodel_count("│ 40 │ width1-depth4 │\n160 distinct sub-models. FLOPs = 2 x ...") == 160
    assert startup.submodel_count("24 distinct sub-models (8 duplicates dropped: heads 0.75 = 1)") == 24
    assert startup.submodel_count("sortednet: error: ...") is None


def test_startup_benchmark_quick_mode_runs_against_the_real_cli(tmp_path):
    """``startup.py --quick``: each case once, ``submodels`` on resnet_tiny's 40-member grid instead of
    ResNet-50's: the benchmark's own checks of exit status and output run against today's CLI."""
    out = tmp_path / "startup.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--quick", "--out", str(out)],
                       cwd=tmp_path, env=CLI_ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, explain(p)
    results = json.loads(out.read_text())["results"]
    assert len(results) == 3 and all(len(r["reps"]) == 1 for r in results.values()), results
    assert [r.get("submodels") for r in results.values() if "submodels" in r] == [40], results
    assert not run_folders(tmp_path)
