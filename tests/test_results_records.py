"""Results that say what they are (issue 23): every output and input path checked before the work, the
results of an older checkpoint beside the latest's (and read by export for that checkpoint), a
replaced export named, results that record what they were measured on (and compare saying when runs
were measured differently), readable sizes in export's lines, and timed draft costs checked against
the FLOPs."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TINY_EVAL, TINY_STEPS, cli, explain

OLD = "step-00000002"  # an older checkpoint made beside the run's latest (step TINY_STEPS)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def one_error_line(p) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("sortednet: error: "), explain(p)
    assert "Traceback" not in p.stderr and "evaluating" not in p.stdout, explain(p)
    return lines[0]


def flat(text: str) -> str:
    return " ".join(text.split())


def with_older_checkpoint(run: Path) -> Path:
    """``run`` with a checkpoint of step 2 beside its latest: the latest's weights, one tensor halved."""
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    old = run / "checkpoints" / OLD
    shutil.copytree(latest, old)
    with safe_open(str(latest / "model.safetensors"), framework="pt") as f:
        metadata = dict(f.metadata())
    weights = load_file(str(latest / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.ndim == 4)
    weights[name] = (weights[name] * 0.5).contiguous()
    save_file(weights, str(old / "model.safetensors"), metadata={**metadata, "step": "2"})
    return old


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory) -> Path:
    """A copy of the shared tiny run with an older checkpoint (step 2) and ``eval --all-submodels``
    results of its latest one."""
    run = tmp_path_factory.mktemp("records") / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "export", "tensorboard"))
    with_older_checkpoint(run)
    p = cli(["eval", "--all-submodels", "--ckpt", run, *TINY_EVAL], cwd=run.parent)
    assert p.returncode == 0, explain(p)
    return run


def test_paths_that_cannot_be_used_are_refused_before_the_work(trained_run, tmp_path):
    """eval/ or export/ a file, a standalone folder with no runs, compare's out under a file: one line,
    exit 2, nothing written, no sub-model evaluated (eval used to evaluate everything, then die with
    an 89-line traceback; standalone was refused after evaluating the whole grid)."""
    run, other = tmp_path / "run", tmp_path / "other"
    for folder in (run, other):
        shutil.copytree(trained_run, folder, ignore=shutil.ignore_patterns("eval", "export", "tensorboard"))
    (run / "eval").write_text("not a folder")
    (run / "export").write_text("not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    cases = {
        "eval": (["eval", "--all-submodels", "--ckpt", run, *TINY_EVAL], f"eval: {run / 'eval'} is a file"),
        "export": (["export", "--budget", "0.5", "--ckpt", run, *TINY_EVAL], f"export: {run / 'export'} is a file"),
        "compare": (["compare", run, tmp_path / "empty", f"out={tmp_path / 'a-file' / 'cmp'}"],
                    f"compare: {tmp_path / 'a-file'} is a file"),
        "standalone": (["eval", "--ckpt", other, f"standalone={tmp_path / 'empty'}", *TINY_EVAL],
                       f"standalone={tmp_path / 'empty'}: no {tmp_path / 'empty' / 'standalone'}/<name>/ runs there"),
    }
    before = snapshot(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(cases, pool.map(lambda c: cli(cases[c][0], cwd=tmp_path), cases)))
    for case, p in done.items():
        assert cases[case][1] in one_error_line(p), (case, explain(p))
    assert snapshot(tmp_path) == before


def test_results_record_the_checkpoint_and_what_they_were_measured_on(evaluated):
    doc = json.loads((evaluated / "eval" / "results.json").read_text())
    assert doc["checkpoint"]["step"] == TINY_STEPS
    m = doc["measured"]
    assert m["test_items"] == 64 and m["calib_batches"] == 2 and m["calib_items"] == 128, m
    assert m["calib_batch_size"] == 64 and m["seed"] == 0 and m["device"] == "cpu" and m["precision"] == "fp32", m
    assert m["val_items"] > 0 and m["processes"] == 1 and m["latency"]["reps"] >= 1, m


def test_an_older_checkpoint_is_measured_beside_the_latest_and_exported_from_its_own_results(evaluated):
    """``eval --ckpt RUN/checkpoints/step-2`` used to replace the latest step's eval/results.json; its
    results go to eval/step-00000002/, export of that checkpoint chooses from them, and a later
    export of the latest that replaces export/budget-0.5/ says what it held and what it holds now."""
    run = evaluated
    latest = (run / "eval" / "results.json").read_bytes()
    p = cli(["eval", "--all-submodels", "--ckpt", run / "checkpoints" / OLD, *TINY_EVAL], cwd=run.parent)
    assert p.returncode == 0, explain(p)
    assert (run / "eval" / "results.json").read_bytes() == latest
    assert f"{OLD} is not the run's latest checkpoint: its results went to {run / 'eval' / OLD}/" in flat(p.stdout)
    doc = json.loads((run / "eval" / OLD / "results.json").read_text())
    assert doc["checkpoint"]["step"] == 2 and doc["checkpoint"]["path"] == f"checkpoints/{OLD}"

    p = cli(["export", "--budget", "0.5", "--ckpt", run / "checkpoints" / OLD, *TINY_EVAL], cwd=run.parent)
    assert p.returncode == 0, explain(p)
    out = flat(p.stdout)
    assert f"from {run / 'eval' / OLD / 'results.json'}" in out, explain(p)
    config = json.loads((run / "export" / "budget-0.5" / "config.json").read_text())
    assert config["checkpoint"]["step"] == 2
    assert "replaced the earlier export" not in out
    # sizes readable at this scale: not "0.00 M params" for 1.5k, nor "0.5 x 0.5 MFLOPs = 0.3 MFLOPs"
    from sortedcli.report import human

    assert "M params" not in out and "MFLOPs" not in out, out
    assert f"budget 0.5 x {human(config['full_flops'])} FLOPs = {human(0.5 * config['full_flops'])} FLOPs" in out
    assert f"{human(config['flops'])} FLOPs" in out and f"{human(config['params'])} params" in out, out
    first = config["name"]

    p = cli(["export", "--budget", "0.5", "--ckpt", run, *TINY_EVAL], cwd=run.parent)
    assert p.returncode == 0, explain(p)
    now = json.loads((run / "export" / "budget-0.5" / "config.json").read_text())
    assert now["checkpoint"]["step"] == TINY_STEPS
    assert (f"replaced the earlier export in {run / 'export' / 'budget-0.5'}/: it held {first} of step 2, "
            f"it now holds {now['name']} of step {TINY_STEPS}") in flat(p.stdout), explain(p)


def test_compare_says_when_runs_were_measured_differently_or_not_recorded(evaluated, tmp_path):
    """68.00 beside 58.92 for the same weights on 50 and 297 test images: compare names the runs and
    what differs, in one warning; a results.json from before the record is "not recorded"."""
    runs = {}
    for name, change in (("a", None), ("b", {"test_items": 297}), ("c", "drop")):
        run = runs[name] = tmp_path / name
        shutil.copytree(evaluated, run, ignore=shutil.ignore_patterns("export", "step-*"))
        path = run / "eval" / "results.json"
        doc = json.loads(path.read_text())
        if change == "drop":
            del doc["measured"]
        elif change:
            doc["measured"].update(change)
        path.write_text(json.dumps(doc))
    p = cli(["compare", runs["a"], runs["b"], f"out={tmp_path / 'ab'}"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    out = flat(p.stdout)
    assert "warning: the runs' results may not be comparable: test items 64 (a) vs 297 (b)." in out, explain(p)
    doc = json.loads((tmp_path / "ab" / "compare.json").read_text())
    assert doc["runs"]["b"]["measured"]["test_items"] == 297 and "64 (a) vs 297 (b)" in doc["measured_differently"]

    p = cli(["compare", runs["a"], runs["c"], f"out={tmp_path / 'ac'}"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "what c measured on is not recorded" in flat(p.stdout), explain(p)

    from sortedcli.report import measured_differently

    same = json.loads((evaluated / "eval" / "results.json").read_text())["measured"]
    assert measured_differently({"a": same, "b": dict(same)}) is None
    assert measured_differently({"a": same, "b": {**same, "device": "cuda"}}) is None  # latency only
    assert "seed 0 (a) vs 1 (b)" in measured_differently({"a": same, "b": {**same, "seed": 1}})


def test_timed_draft_costs_far_from_the_flops_are_replaced_by_the_flops_ratios():
    """An LLM evaluated under load timed exit 3 of 4 at 0.02x the full model's step (FLOPs: ~0.9x) and
    predicted a 22.71x speculative speed-up: costs outside [0.25x, 4x] of the FLOPs ratio are not
    believed; the FLOPs ratios (full head) are used, and a line says so."""
    from sortedcli.commands.eval import checked_costs

    flops = {1: 0.35, 3: 0.9}
    fine = {(1, None): 0.4, (3, None): 0.85, (1, 4096): 0.2, (3, 4096): 0.7}
    assert checked_costs(fine, flops) == (fine, None)
    busy = {**fine, (3, None): 0.02}
    c, note = checked_costs(busy, flops)
    assert c == {(1, None): 0.35, (3, None): 0.9}
    assert "exit 3: 0.02x the full model's, where its FLOPs are 0.90x" in note and "unreliable" in note
    _, note = checked_costs({**busy, (1, None): 3.0}, flops)
    assert "exit 1: 3.00x" in note and "and 1 other exit;" in note


def test_results_written_before_fingerprints_are_fresh_by_their_sha256(evaluated, tmp_path):
    """results.json of an older sortednet recorded the weights file's sha256, not a fingerprint:
    export accepts them when that sha256 is the checkpoint's (it asked for an evaluation again), and
    still refuses them when it is not."""
    import hashlib
    from types import SimpleNamespace

    from sortedcli import runs
    from sortedcli.commands.export import check_fresh
    from sortedcli.errors import UsageError

    ckpt = runs.latest_checkpoint(evaluated)
    record = runs.checkpoint_record(evaluated, ckpt)
    r = SimpleNamespace(record=record, ckpt=ckpt, run_dir=evaluated)
    doc = json.loads((evaluated / "eval" / "results.json").read_text())
    sha = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    for digest, fresh in ((sha, True), ("0" * 64, False)):
        doc["checkpoint"] = {"step": record["step"], "path": record["path"], "sha256": digest}
        (tmp_path / "results.json").write_text(json.dumps(doc))
        if fresh:
            check_fresh(tmp_path / "results.json", r)
        else:
            with pytest.raises(UsageError, match="run sortednet eval --all-submodels"):
                check_fresh(tmp_path / "results.json", r)
