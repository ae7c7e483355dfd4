"""A new user's noisy cases (issue 23): the right outcome, but a traceback, raw Python text or advice
that leads nowhere. Each now ends as the cases of ``test_mistakes.py`` do: one line ``sortednet:
error: ...`` that says what to do, exit status 2, nothing written; and ``train --help`` lists the
recipes.

Each case runs ``sortednet`` in a fresh folder (``home``), concurrently, with what the case needs
there: nothing, a copy of the shared tiny trained run (``{run}``), that run exported at budget 0.5
(``run:export``), or an image tree whose ``train/dog`` holds no image (``images:empty-class``).
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import CLI_ENV, TINY, TINY_EVAL, cli, explain, selected_cases
from test_mistakes import IMAGES, _cli, png, snapshot

OFFLINE = {**CLI_ENV, "HF_HUB_OFFLINE": "1"}

# id: (args, home, fragment of the one line)    home: "empty", "run[:export]" or "images:empty-class"
CASES = {
    # a cache the tokenizer cannot be written to: a 71-line traceback after the corpus was read, and a
    # run folder left behind; now refused before the work, naming the variable and the path
    "cache-in-proc": (["train", "model=llama_tiny", "data=alpaca", "trainer.max_steps=1"], "empty",
                      "SORTEDNET_CACHE=/proc/sortednet-x: cannot write sortednet's cache there"),
    # a number where a list goes: "'float' object is not iterable" in a traceback
    "width-levels-a-number": (["train", *TINY, "dims.width.levels=0.5"], "empty",
                              "dims.width.levels must be a list, e.g. 'dims.width.levels=[0.5,1.0]', got 0.5"),
    "depth-levels-a-number": (["submodels", "model=resnet_tiny", "dims.depth.levels=3"], "empty",
                              "dims.depth.levels must be a list"),
    # a prompt with '=' read as a setting ("unknown key a", or Hydra's "Ambiguous value")
    "generate-prompt-with-equals": (["generate", "a=b"], "empty", 'sortednet generate --prompt "a=b"'),
    # a causal LM on image data was advised the classification data sets it then refused
    "recipe-images-for-a-causal-lm": (["train", "--recipe", "digits_tiny", "model=llama_tiny"], "empty",
                                      "(data=NAME: news, hamlet, corpus, gsm8k, alpaca, chat, chitchat)"),
    "images-for-a-text-classifier": (["train", "--recipe", "rotten_tomatoes_minilm", "data=digits"], "empty",
                                     "(data=NAME: rotten_tomatoes, glue, text)"),
    # an empty class folder was "data.root must hold train/ and val/" (they were there)
    "imagefolder-empty-class": (["train", *IMAGES], "images:empty-class", "class folder {images}/train/dog holds no "
                                                                          "images"),
    # a stray word got Hydra's "cannot read the override" with a quoting hint
    "export-stray-number": (["export", "0.5"], "empty", "did you mean --budget 0.5?"),
    "eval-stray-run": (["eval", "{run}"], "run", "did you mean --ckpt {run}?"),
    "export-stray-run": (["export", "--budget", "0.5", "{run}"], "run", "did you mean --ckpt {run}?"),
    "train-stray-run": (["train", "{run}"], "run", "did you mean --resume {run}?"),
    "generate-run-as-prompt": (["generate", "{run}", "hello"], "run", "did you mean --ckpt {run}?"),
    "eval-stray-word": (["eval", *TINY_EVAL, "quickly"], "run",
                        "stray word 'quickly': sortednet eval takes its flags (--all-submodels, --ckpt) and "
                        "key=value overrides"),
    # generate on an image classifier: a tokenizer error (the export), or no word of what it is (the run)
    "generate-vision-export": (["generate", "--ckpt", "{run}/export/budget-0.5", "hello"], "run:export",
                               "generate needs a causal LM; {run}/export/budget-0.5 is a resnet_tiny image "
                               "classifier"),
    "generate-vision-run": (["generate", "--ckpt", "{run}", "hello"], "run",
                            "generate needs a causal LM; {run} is a resnet_tiny image classifier"),
    # SORTEDNET_CONF / SORTEDNET_RECIPES that name a missing or empty folder: name both
    "conf-missing": (["train", *TINY], "empty", "SORTEDNET_CONF=/no/such/conf: no such folder"),
    "conf-empty": (["submodels"], "empty", "SORTEDNET_CONF={home}/empty: that folder lacks sortednet's configs"),
    "recipes-missing": (["train", "--recipe", "digits_tiny"], "empty",
                        "SORTEDNET_RECIPES=/no/such/recipes: no such folder"),
    "recipes-empty": (["plan", "--recipe", "digits_tiny"], "empty",
                      "SORTEDNET_RECIPES={home}/empty: that folder lacks sortednet's recipes"),
    "recipe-misspelled": (["train", "--recipe", "digit_tiny"], "empty",
                          "unknown recipe 'digit_tiny' (did you mean digits_tiny?)"),
}
ENV = {"cache-in-proc": {"SORTEDNET_CACHE": "/proc/sortednet-x"},
       "conf-missing": {"SORTEDNET_CONF": "/no/such/conf"}, "conf-empty": {"SORTEDNET_CONF": "{home}/empty"},
       "recipes-missing": {"SORTEDNET_RECIPES": "/no/such/recipes"},
       "recipes-empty": {"SORTEDNET_RECIPES": "{home}/empty"}}
NOT_SAID = {"recipe-images-for-a-causal-lm": "rotten_tomatoes", "images-for-a-text-classifier": "alpaca",
            "generate-vision-export": "tokenizer"}


def prepare(case: str, home: Path, run: Path | None) -> tuple[list[str], dict, str]:
    args, setup, fragment = CASES[case]
    kind, _, variant = setup.partition(":")
    names = {"home": str(home)}
    if kind == "run":
        names["run"] = str(shutil.copytree(run, home / "runs" / run.name))
        if variant == "export":
            p = cli(["export", "--budget", "0.5", "--ckpt", names["run"], *TINY_EVAL], cwd=home)
            assert p.returncode == 0, explain(p)
    if kind == "images":  # cat has images in both splits, dog only in val/
        for split in ("train", "val"):
            for c, name in enumerate(("cat", "dog")):
                (home / "images" / split / name).mkdir(parents=True)
                for i in range(3 if (split, name) != ("train", "dog") else 0):
                    png(home / "images" / split / name / f"{i}.png", 40 * c + 10 * i)
        names["images"] = str(home / "images")
    (home / "empty").mkdir()
    env = {k: v for k, v in OFFLINE.items() if k not in ("SORTEDNET_LLM_DATA", "SORTEDNET_CONF", "SORTEDNET_RECIPES")}
    env |= ENV.get(case, {})

    def fill(text: str) -> str:
        for key, value in names.items():
            text = text.replace("{" + key + "}", value)
        return text

    return [fill(a) for a in args], {k: fill(v) for k, v in env.items()}, fill(fragment)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Every selected case, run concurrently: ``{case: (process, files before, files after, fragment)}``."""
    wanted, run = selected_cases(request, __name__, CASES)

    def one(case):
        home = tmp_path_factory.mktemp(case)
        args, env, fragment = prepare(case, home, run)
        before = snapshot(home)
        p = _cli(args, home, env)
        return p, before, snapshot(home), fragment

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(wanted, pool.map(one, wanted)))


@pytest.mark.parametrize("case", CASES)
def test_a_noisy_case_is_one_line_exit_2_and_writes_nothing(case, outcomes):
    p, before, after, fragment = outcomes[case]
    assert p.returncode == 2, explain(p)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: "), explain(p)
    assert "Traceback" not in p.stderr and fragment in lines[0], explain(p)
    if case in NOT_SAID:
        assert NOT_SAID[case] not in lines[0], explain(p)
    assert after == before, sorted(set(after) ^ set(before))


def test_train_and_plan_help_list_the_recipes(tmp_path):
    """``train --help`` listed the config groups but no recipe: ``--recipe`` took a name found nowhere."""
    from sortedcli.cli import RECIPES_DIR

    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert "digits_tiny" in names
    for verb in ("train", "plan"):
        p = cli([verb, "--help"], cwd=tmp_path)
        assert p.returncode == 0, explain(p)
        assert f"== Recipes (--recipe NAME) ==\n{', '.join(names)}\n" in p.stdout, explain(p)
    assert not list(tmp_path.iterdir())


def test_a_prompt_with_equals_passes_as_prompt_and_settings_still_pass():
    """Only a key generate lacks reads as a prompt: its own settings and Hydra's stay settings."""
    from sortedcli.cli import _Usage, translate

    assert translate("generate", ["--prompt", "a=b"]) == ["prompt='a=b'"]
    assert translate("generate", ["temperature=0.5", "hydra.run.dir=.", "trainer.device=cpu", "x + y = 3"]) == [
        "temperature=0.5", "hydra.run.dir=.", "trainer.device=cpu", "prompt='x + y = 3'"]
    with pytest.raises(_Usage, match="--prompt"):
        translate("generate", ["a=b"])
    assert translate("train", ["~sampler.g", "seed=1"]) == ["~sampler.g", "seed=1"]  # a deletion has no '='
