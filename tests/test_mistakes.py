"""A new user's mistakes, every verb: one line on stderr ``sortednet: error: ...`` that says what to do,
exit status 2, no traceback, and nothing written (no run folder, no files in the working folder).

Each case runs ``sortednet`` in a fresh folder (``home``) that holds what the case needs: nothing, a
copy of the shared tiny trained run (``{run}``; conftest.py), or a small ImageFolder tree of PNGs the
test writes (``{images}``). The cases run concurrently (most of a CLI call is importing torch). The
hub is never contacted: HF_HUB_OFFLINE=1 everywhere, and the one case of the reachability probe points
HF_ENDPOINT at a closed local port.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import CLI_ENV, TINY, TINY_EVAL, cli, explain, selected_cases

OFFLINE = {**CLI_ENV, "HF_HUB_OFFLINE": "1"}
PROBE = {k: v for k, v in CLI_ENV.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": "http://127.0.0.1:9"}
IMAGES = ["model=resnet_tiny", "data=imagefolder", "data.root={images}", "data.image_size=16", "data.num_classes=2",
          "trainer.batch_size=4", "trainer.max_steps=1", "trainer.epoch_eval=false", "dims=[depth]",
          "eval.calib_batches=1", "eval.calib_batch_size=4"]
BERT = ["model=bert", "data=rotten_tomatoes", "dims=[depth]", "trainer.max_steps=1"]

# id: (args, home, fragment of the one line)    home: "empty", "run" or "images[:variant]"
CASES = {
    # --- wrong before: exit 0, or a silent change of meaning
    "no-verb": ([], "empty", "give a command"),
    "plus-unknown-trainer-key": (["train", *TINY, "+trainer.max_step=5"], "empty",
                                 "unknown key trainer.max_step (did you mean trainer.max_steps?)"),
    "plus-unknown-optim-key": (["train", *TINY, "+optim.momentun=0.5"], "empty", "did you mean optim.momentum?"),
    "plus-unknown-eval-key": (["train", *TINY, "+eval.calib_batch=3"], "empty", "did you mean eval.calib_batches?"),
    "plus-unknown-data-key": (["train", *TINY, "+data.train_subst=10"], "empty", "did you mean data.train_subset?"),
    "plus-unknown-model-key": (["train", *TINY, "+model.small_stm=true"], "empty", "did you mean model.small_stem?"),
    "force-add-unknown-key": (["train", *TINY, "++trainer.max_step=5"], "empty", "unknown key trainer.max_step"),
    "plus-unknown-nested-key": (["train", *TINY, "+eval.latency.rep=2"], "empty", "did you mean eval.latency.reps?"),
    "plus-unknown-top-key": (["train", *TINY, "+seeed=1"], "empty", "did you mean seed?"),
    "plus-unknown-eval-verb-key": (["eval", *TINY_EVAL, "+eval.test_subst=8"], "run", "eval.test_subset"),
    "imagefolder-one-class": (["train", *IMAGES, "data.num_classes=1"], "images:one-class", "two or more"),
    "imagefolder-num-classes-differ": (["train", *IMAGES, "data.num_classes=5"], "images",
                                       "set data.num_classes=2"),
    "generate-exit-and-speculative": (["generate", "--exit", "2", "--speculative", "hello"], "empty",
                                      "--exit and --speculative"),
    "generate-exit-and-early-exit": (["generate", "--exit", "2", "--early-exit", "hello"], "empty",
                                     "--exit and --early-exit"),
    "generate-draft-exit-alone": (["generate", "--draft-exit", "2", "hello"], "empty", "add --speculative"),
    "generate-check-first-alone": (["generate", "check_first=0.3", "hello"], "empty", "add --speculative"),
    "generate-check-first-above-one": (["generate", "--speculative", "check_first=2", "hello"], "empty",
                                       "check_first must be a first-draft acceptance rate in [0, 1]"),
    # --- noisy before: the right exit status, but many lines, a traceback or another subject
    "misspelled-model": (["train", *TINY, "model=resnet_tin"], "empty", "did you mean resnet_tiny?"),
    "misspelled-data": (["train", *TINY, "data=digit"], "empty", "did you mean digits?"),
    "misspelled-dim": (["train", *TINY, "dims=[width,kernel]"], "empty", "the dims options are depth, ffn"),
    "misspelled-sampler": (["train", *TINY, "sampler=sandwhich"], "empty", "did you mean sandwich?"),
    "misspelled-optim": (["train", *TINY, "optim=adam"], "empty", "did you mean adamw?"),
    "misspelled-submodels-model": (["submodels", "model=resnet5"], "empty", "the model options are"),
    "unknown-trainer-key": (["train", *TINY, "trainer.max_step=5"], "empty", "did you mean trainer.max_steps?"),
    "unknown-key-in-eval": (["eval", *TINY_EVAL, "model.small_stem=true"], "run", "unknown key model.small_stem"),
    "plus-on-a-known-key": (["train", *TINY, "+trainer.epochs=2"], "empty", "set it with trainer.epochs=VALUE"),
    "unparsable-override": (["train", *TINY, "trainer.epochs=[1"], "empty", "cannot read the override"),
    "runs-in-proc": (["train", *TINY, "paths.runs=/proc/sortednet-x"], "empty", "paths.runs=DIR"),
    "imagefolder-too-few-for-a-batch": (["train", *IMAGES, "trainer.batch_size=128"], "images",
                                        "lower trainer.batch_size"),
    "imagefolder-not-an-image": (["train", *IMAGES], "images:not-an-image", "is not a readable image"),
    "pretrained-missing-folder": (["train", *BERT, "model.pretrained=/no/such/dir"], "empty",
                                  "model.pretrained=/no/such/dir: no such folder"),
    "pretrained-hub-id-offline": (["train", *BERT, "model.pretrained=someone/some-bert"], "empty",
                                  "model.pretrained=LOCAL_DIR"),
    "compare-out-exists": (["compare", "{run}", "{other}", "out={home}/taken"], "run:taken", "pass out=NEW_DIR"),
    "eval-test-subset-0": (["eval", *TINY_EVAL, "eval.test_subset=0"], "run", "eval.test_subset must be"),
    # --- more of a new user's mistakes, across the verbs
    "unknown-flag-train": (["train", "--epochs", "3"], "empty", "trainer.epochs=3"),
    "unknown-flag-eval": (["eval", "--all"], "empty", "unknown flag --all"),
    "unknown-flag-export": (["export", "--budget", "0.5", "--format", "onnx"], "empty", "unknown flag --format"),
    "batch-size-0": (["train", *TINY, "trainer.batch_size=0"], "empty", "trainer.batch_size must be"),
    "epochs-abc": (["train", *TINY, "trainer.epochs=abc"], "empty", "trainer.epochs must be"),
    "lr-negative": (["train", *TINY, "optim.lr=-1"], "empty", "optim.lr must be"),
    "train-subset-negative": (["train", *TINY, "data.train_subset=-5"], "empty", "data.train_subset must be"),
    "width-level-above-1": (["train", *TINY, "dims.width.levels=[0.5,1.5]"], "empty", "1.5"),
    "depth-level-too-deep": (["train", *TINY, "dims.depth.levels=[1,9]"], "empty", "9"),
    "imagefolder-no-root": (["train", "model=resnet_tiny", "data=imagefolder", "data.num_classes=2"], "empty",
                            "data.root"),
    "imagefolder-missing-root": (["train", *IMAGES, "data.root=/no/such/images"], "images", "train/ and val/"),
    "image-data-for-a-text-model": (["train", *BERT, "model.pretrained=null", "data=digits",
                                     "model.config={hidden_size:32,num_hidden_layers:2,num_attention_heads:2,"
                                     "intermediate_size:64}"], "empty", "tokenizer"),
    "ckpt-is-a-file": (["eval", "--ckpt", "{home}/notes.txt", *TINY_EVAL], "run:file", "notes.txt is a file"),
    "eval-batch-size-0": (["eval", *TINY_EVAL, "eval.batch_size=0"], "run", "eval.batch_size must be"),
    "eval-test-subset-abc": (["eval", *TINY_EVAL, "eval.test_subset=abc"], "run", "eval.test_subset must be"),
    "compare-missing-run": (["compare", "no/such/run", "{run}"], "run", "no/such/run is not a run folder"),
    "submodels-unknown-key": (["submodels", "+trainer.epochs_=3"], "empty", "unknown key trainer"),
    "multirun-unknown-key": (["train", "-m", *TINY, "trainer.max_step=1,2"], "empty", "trainer.max_step"),
    "hub-unreachable": (["train", *BERT, "model.pretrained=someone/some-bert"], "empty:probe",
                        "the Hugging Face hub is not reachable"),
}


def png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, value // 2)).save(path)


def image_tree(root: Path, variant: str) -> Path:
    """train/ and val/ with 3 images per class (two classes, or one), maybe one file that is not one."""
    classes = ["cat"] if variant == "one-class" else ["cat", "dog"]
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for i in range(3):
                png(root / split / name / f"{i}.png", 40 * c + 10 * i)
    if variant == "not-an-image":
        (root / "train" / "cat" / "3.png").write_text("this is not a PNG\n")
    return root


def prepare(case: str, home: Path, run: Path | None) -> tuple[list[str], dict]:
    args, setup, _ = CASES[case]
    kind, _, variant = setup.partition(":")
    names = {"home": str(home)}
    if kind == "run":
        names["run"] = str(shutil.copytree(run, home / "runs" / run.name))
        if variant == "taken":  # evaluated (compare reads eval/results.json), and out= already used
            p = cli(["eval", "--all-submodels", "--ckpt", names["run"], *TINY_EVAL, "eval.latency.reps=1",
                     "eval.latency.warmup=0"], cwd=home)
            assert p.returncode == 0, explain(p)
            names["other"] = str(shutil.copytree(names["run"], home / "runs" / "other"))
            (home / "taken").mkdir()
            (home / "taken" / "compare.csv").write_text("someone's table\n")
        if variant == "file":
            (home / "notes.txt").write_text("not a run\n")
    if kind == "images":
        names["images"] = str(image_tree(home / "images", variant))
    env = PROBE if variant == "probe" else OFFLINE
    for key, value in names.items():
        args = [a.replace("{" + key + "}", value) for a in args]
    return args, env


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Every selected case, run concurrently: ``{case: (process, files before, files after)}``."""
    wanted, run = selected_cases(request, __name__, CASES)

    def one(case):
        home = tmp_path_factory.mktemp(case)
        args, env = prepare(case, home, run)
        before = snapshot(home)
        p = _cli(args, home, env)
        return p, before, snapshot(home)

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(wanted, pool.map(one, wanted)))


def _cli(args, cwd, env):
    return cli(args, cwd, env=env)


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line_exit_2_and_writes_nothing(case, outcomes):
    p, before, after = outcomes[case]
    assert p.returncode == 2, explain(p)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sortednet: error: "), explain(p)
    assert "Traceback" not in p.stderr and CASES[case][2] in lines[0], explain(p)
    if case != "multirun-unknown-key":  # Hydra's launcher writes the sweep's multirun.yaml before any job
        assert after == before, sorted(set(after) ^ set(before))
    if case == "compare-out-exists":
        assert p.stdout == "", p.stdout  # refused before the table, not after it


def test_cfg_job_shows_the_config_wherever_it_stands(tmp_path):
    """``--cfg job`` is Hydra's; argparse took it only before or after all the overrides."""
    for args in (["train", "model=resnet_tiny", "--cfg", "job", "trainer.epochs=3"],
                 ["eval", "--all-submodels", "--cfg", "job", "eval.test_subset=8"]):
        p = cli(args, cwd=tmp_path)
        assert p.returncode == 0, explain(p)
        assert "test_subset: 8" in p.stdout or "epochs: 3" in p.stdout, explain(p)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def lm_home(tmp_path_factory) -> Path:
    """A folder whose runs/ holds one tiny LLaMA trained a step on a corpus of 12 short documents."""
    from sortedcli.data import lm

    home = tmp_path_factory.mktemp("lm")
    docs = [f"Story {i}. " + "The cat sat on the mat and the dog sat on the log. " * 6 for i in range(12)]
    (home / "corpus.txt").write_text("\n\n".join(docs))
    lm.train_tokenizer(docs, 300, home / "tok")
    p = cli(["train", "model=llama_tiny", f"model.tokenizer={home / 'tok'}", "data=corpus",
             f"data.path={home / 'corpus.txt'}", "data.doc_chars=200", "data.block_size=16",
             "data.test_fraction=0.25", "dims=[depth]", "sampler=full", "optim=adamw", "trainer.batch_size=4",
             "trainer.max_steps=1", "trainer.epoch_eval=false", "eval.batch_size=8",
             "model.config.hidden_size=32", "model.config.intermediate_size=64"], cwd=home)
    assert p.returncode == 0, explain(p)
    return home


@pytest.mark.parametrize("setting,says", [("data.test_fraction=0", "data.test_fraction must be in (0, 1)"),
                                          ("data.block_size=0", "data.block_size must be >= 2"),
                                          ("data.doc_chars=0", "data.doc_chars must be >= 1")])
def test_a_zero_data_setting_is_refused_not_replaced_by_the_default(lm_home, tmp_path, setting, says):
    """A 0 the user gave was read as unset: test_fraction=0 held out 5%, block_size=0 trained on 256."""
    p = cli(["train", "model=llama_tiny", f"model.tokenizer={lm_home / 'tok'}", "data=corpus",
             f"data.path={lm_home / 'corpus.txt'}", "dims=[depth]", "trainer.max_steps=1", setting,
             *([] if "doc_chars" in setting else ["data.doc_chars=200"])], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and says in p.stderr, explain(p)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sequences_longer_than_the_models_context_are_refused(lm_home, tmp_path):
    """Blocks of 32 tokens for a model of 16 positions trained silently; generate then refused prompts
    past 16 and the export's config still said 16."""
    p = cli(["train", "model=llama_tiny", f"model.tokenizer={lm_home / 'tok'}", "data=corpus",
             f"data.path={lm_home / 'corpus.txt'}", "data.doc_chars=200", "data.block_size=32",
             "model.config.max_position_embeddings=16", "dims=[depth]", "trainer.max_steps=1"], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, explain(p)
    assert "run to 32 tokens but the model's context is 16 positions" in p.stderr, explain(p)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("verb", ["eval", "generate"])
def test_ckpt_of_a_folder_that_is_no_run_says_so_not_to_remove_it(lm_home, tmp_path, verb):
    """--ckpt of a tokenizer folder was told to "train it again (remove the folder, ...)"."""
    p = cli([verb, "--ckpt", lm_home / "tok", *(["hello"] if verb == "generate" else [])], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is not a run folder" in p.stderr, explain(p)
    assert (lm_home / "tok" / "tokenizer.json").is_file()


def test_eval_test_subset_counts_the_examples_of_a_language_model(lm_home):
    """``eval.test_subset=N`` on a language-model run evaluates N blocks (it cut N documents, each of
    many blocks, so the number of examples did not follow it)."""
    p = cli(["eval", "eval.test_subset=5", "eval.latency.reps=1", "eval.latency.warmup=0"], cwd=lm_home)
    assert p.returncode == 0, explain(p)
    assert "on 5 test examples" in p.stdout, explain(p)


@pytest.mark.slow
def test_generate_reads_an_export_folder_as_it_reads_the_run(lm_home):
    """``generate --ckpt RUN/export/budget-1``: the folder `sortednet export` wrote (it said the folder
    was not written by sortednet); the full-size export greedily writes what the run writes."""
    p = cli(["export", "--budget", "1"], cwd=lm_home)
    assert p.returncode == 0, explain(p)
    folder = next((lm_home / "runs").iterdir()) / "export" / "budget-1"
    texts = []
    for ckpt in ([], ["--ckpt", folder]):
        g = cli(["generate", *ckpt, "--max-tokens", "8", "The cat"], cwd=lm_home)
        assert g.returncode == 0, explain(g)
        texts.append(g.stdout)
    assert texts[0] == texts[1] and texts[0].strip(), texts


def test_a_mistake_found_after_the_run_copied_its_tokenizer_leaves_no_run_folder(lm_home, tmp_path):
    """The grid is checked once the model is built, after the run keeps its copy of model.tokenizer:
    that copy alone used to keep the failed run's folder."""
    p = cli(["train", "model=llama_tiny", f"model.tokenizer={lm_home / 'tok'}", "data=corpus",
             f"data.path={lm_home / 'corpus.txt'}", "data.doc_chars=200", "data.block_size=16",
             "dims=[depth]", "dims.depth.levels=[1,9]", "trainer.max_steps=1"], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "integers in 1..4" in p.stderr, explain(p)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
