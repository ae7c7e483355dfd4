"""The ablation's workflow end to end: sub-models trained alone (``standalone=[...]``) beside a sorted
run in ``eval``, and the adaptive samplers' runs resumed exactly (their state is in the checkpoint)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import TINY, TINY_EVAL, cli, explain, run_folders


def _weights(run):
    step = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / step / "model.safetensors"))


def test_standalone_runs_train_each_submodel_alone_and_eval_shows_percent_of_standalone(trained_run, tmp_path):
    names = ["width0.25-depth1", "width1-depth4"]
    p = cli(["train", *TINY, f"standalone=[{','.join(names)}]", f"hydra.run.dir={tmp_path / 'alone'}"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    alone = tmp_path / "alone" / "standalone"
    assert sorted(d.name for d in alone.iterdir()) == sorted(names)
    cfg = OmegaConf.load(alone / "width0.25-depth1" / "config.yaml")
    assert cfg.sampler.name == "full" and list(cfg.dims.width.levels) == [0.25] and list(cfg.dims.depth.levels) == [1]
    assert cfg.standalone is None and not cfg.distill.enabled
    assert run_folders(alone) == [alone / n for n in sorted(names)]

    run = shutil.copytree(trained_run, tmp_path / "sorted", ignore=shutil.ignore_patterns("eval", "export"))
    p = cli(["eval", "--all-submodels", "--ckpt", run, f"standalone={tmp_path / 'alone'}", *TINY_EVAL], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "% of alone" in p.stdout and "vs trained alone (2 sub-models)" in p.stdout
    rows = {r["name"]: r for r in json.loads((run / "eval" / "results.json").read_text())["rows"]}
    for name in names:
        r = rows[name]
        assert r["standalone"] > 0 and r["rel_standalone"] == pytest.approx(100 * r["accuracy"] / r["standalone"])
    assert rows["width0.5-depth2"]["standalone"] is None and rows["width0.5-depth2"]["rel_standalone"] is None
    header = (run / "eval" / "results.csv").read_text().splitlines()[0]
    assert header.endswith("standalone,rel_standalone")

    bad = cli(["train", *TINY, "standalone=[width0.3-depth1]", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path)
    assert bad.returncode == 2 and "not a sub-model of the grid" in bad.stderr, explain(bad)
    missing = cli(["eval", "--ckpt", run, f"standalone={tmp_path / 'nowhere'}", *TINY_EVAL], cwd=tmp_path)
    assert missing.returncode == 2 and "standalone=" in missing.stderr, explain(missing)


@pytest.mark.parametrize("sampler", [
    ["sampler=lossaware", "sampler.g=2", "sampler.largest=true"],
    ["sampler=progressive", "sampler.g=2", "sampler.warmup=0.25", "sampler.ramp=0.5", "distill.enabled=true"],
])
def test_adaptive_and_progressive_runs_resume_bitwise_exactly(tmp_path, sampler):
    over = [*TINY, *sampler, "trainer.epochs=2", "trainer.ckpt_every=1"]
    stopped = cli(["train", *over, "trainer.max_steps=3", "paths.runs=stopped"], cwd=tmp_path)
    assert stopped.returncode == 0, explain(stopped)
    (run,) = run_folders(tmp_path / "stopped")
    resumed = cli(["train", "--resume", run, "trainer.max_steps=null"], cwd=tmp_path)
    assert resumed.returncode == 0, explain(resumed)
    whole = cli(["train", *over, "paths.runs=whole"], cwd=tmp_path)
    assert whole.returncode == 0, explain(whole)
    (ref,) = run_folders(tmp_path / "whole")
    a, b = _weights(run), _weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(run / "checkpoints" / "step-00000008" / "state.pt", weights_only=True)["sampler"]
    sb = torch.load(ref / "checkpoints" / "step-00000008" / "state.pt", weights_only=True)["sampler"]
    assert sa["steps"] == sb["steps"] == 8
    if "ema" in sa:
        torch.testing.assert_close(sa["ema"], sb["ema"], rtol=0, atol=0, equal_nan=True)  # NaN: not yet seen
        assert not torch.isnan(sa["ema"]).all()


def test_compare_summarizes_each_method_against_plain_training_and_standalone(tmp_path):
    """The ablation table's columns, from fake runs: full model, points vs the plain run, lowest as % of
    full and of standalone, how many at >= 96% of full, training time as a ratio to the plain run."""
    from rich.console import Console

    from sortedcli.commands import compare

    def fake(name, sampler, accs, seconds, alone=None):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"model": {"name": "resnet_tiny"}, "data": {"name": "digits"},
                                         "sampler": {"name": sampler}}), run / "config.yaml")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": seconds / 2}) + "\n"
                                           + json.dumps({"epoch": 1, "time": seconds}) + "\n")
        rows = []
        for i, acc in enumerate(accs):
            row = {"name": f"width{i + 1}", "dims": {"width": i + 1}, "accuracy": acc, "flops": 10 ** (i + 1),
                   "full": i == len(accs) - 1}
            if alone and row["name"] in alone:
                row |= {"standalone": alone[row["name"]], "rel_standalone": 100 * acc / alone[row["name"]]}
            rows.append(row)
        (run / "eval" / "results.json").write_text(json.dumps({"metric": "accuracy", "rows": rows}))
        return str(run)

    plain = fake("plain", "full", [10.0, 50.0, 90.0], 100.0)
    sortd = fake("sorted", "lossaware", [80.0, 87.0, 89.0], 250.0, alone={"width1": 85.0, "width3": 90.0})
    cfg = OmegaConf.create({"runs": [plain, sortd], "out": str(tmp_path / "cmp"), "paths": {"runs": str(tmp_path)}})
    compare.run(cfg, Console(width=200, record=True))
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    by = {e["run"]: e for e in doc["summary"]}
    s = by["sorted"]
    assert s["full_vs_plain"] == pytest.approx(-1.0) and s["time_vs_plain"] == pytest.approx(2.5)
    assert s["at_96"] == 2 and s["lowest"] == "width1" and s["lowest_rel"] == pytest.approx(100 * 80 / 89)
    assert s["lowest_vs_standalone"] == "width1" and s["lowest_rel_standalone"] == pytest.approx(100 * 80 / 85)
    assert by["plain"]["full_vs_plain"] == 0 and "lowest_rel_standalone" not in by["plain"]


def test_ablation_recipe_trains_the_winner_and_each_method_is_one_override_away():
    from test_configs import recipe

    cfg = recipe("ablation_tiny")
    assert dict(cfg.sampler) | {"sharpness": 0, "momentum": 0, "floor": 0} == \
        {"name": "lossaware", "g": 3, "largest": True, "sharpness": 0, "momentum": 0, "floor": 0}
    assert cfg.standalone is None and cfg.data.train_subset == 10000
    paper = recipe("ablation_tiny", ["sampler=sortednet"])
    # not the winner's g, nor its largest every step
    assert dict(paper.sampler) == {"name": "sortednet", "g": 1, "all_exits": False, "largest": False}


def test_compare_of_perplexity_runs_calls_the_highest_perplexity_the_weakest(tmp_path):
    """Lower is better: the weakest sub-model is the one with the highest perplexity, % of full is
    full / sub, the best run of a row is the lowest (SmolLM2's compare had them upside down)."""
    from rich.console import Console

    from sortedcli.commands import compare

    def fake(name, sampler, ppls):
        run = tmp_path / name
        (run / "eval").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"model": {"name": "llama"}, "data": {"name": "gsm8k"},
                                         "sampler": {"name": sampler}}), run / "config.yaml")
        rows = [{"name": f"depth{i + 1}", "dims": {"depth": i + 1}, "perplexity": p, "flops": 10 ** (i + 1),
                 "full": i == len(ppls) - 1} for i, p in enumerate(ppls)]
        (run / "eval" / "results.json").write_text(json.dumps({"metric": "perplexity", "higher_is_better": False,
                                                               "rows": rows}))
        return str(run)

    sft = fake("sft", "full", [5e6, 1e3, 2.0])
    soft = fake("soft", "all", [50.0, 4.0, 2.5])
    cfg = OmegaConf.create({"runs": [sft, soft], "out": str(tmp_path / "cmp"), "paths": {"runs": str(tmp_path)}})
    console = Console(width=200, record=True)
    compare.run(cfg, console)
    by = {e["run"]: e for e in json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"]}
    assert by["soft"]["lowest"] == "depth1" and by["soft"]["lowest_rel"] == pytest.approx(100 * 2.5 / 50)
    assert by["sft"]["lowest"] == "depth1" and by["soft"]["at_96"] == 1
    assert by["soft"]["full_vs_plain"] == pytest.approx(0.5)
    text = console.export_text()
    assert "+0.50 perplexity" in text and "points" not in text
