"""``benchmarks/ablation.py``: the training-method ablation at equal wall time. The step counts come from
an injected calibration (nothing timed), the bookkeeping that makes the study resumable is checked on
folders written here, and one tiny study runs end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CLI_ENV, explain

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablation  # noqa: E402

CALIBRATION = {"steps_per_epoch": 421, "methods": {"full": 0.2, "sortednet": {"sec_per_step": 0.0766},
                                                    "lossaware": 0.35}}


def test_dry_run_computes_each_methods_steps_from_the_calibration_and_writes_nothing(tmp_path, capsys):
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps(CALIBRATION))
    runs, out = tmp_path / "runs", tmp_path / "out"
    assert ablation.main(["--recipe", "default", "--seeds", "0", "1", "--budget-x", "1", "2", "--methods", "full",
                          "sortednet", "lossaware", "--calibration", str(cal), "--runs", str(runs), "--out", str(out),
                          "--dry-run"]) == 0
    text = capsys.readouterr().out
    steps = {(m, x): round(258 * x / s) for m, s in (("full", 0.2), ("sortednet", 0.0766), ("lossaware", 0.35))
             for x in (1, 2)}
    assert steps[("sortednet", 1)] == 3368 == 8 * 421  # the g=1 `make run` the study began from, at its own speed
    for (m, x), n in steps.items():
        for seed in (0, 1):
            assert (f"hydra.run.dir={runs}/{x}x-seed{seed}/{m} trainer.epoch_eval=false trainer.log_every=10 "
                    f"trainer.tensorboard=false {' '.join(ablation.METHODS[m])} seed={seed} trainer.steps={n}") in text
        assert f"{n} steps ({n / 421:.2f} epochs) in {258 * x:g} s" in text
    assert "'standalone=[width0.1-depth1,width1-depth1,width0.1-depth8,width0.5-depth4,width0.3-depth3," \
           "width1-depth8]'" in text and f"standalone={runs}/alone-seed1" in text  # each seed its own yardstick
    assert f"out={out}/compare/2x" in text and "eval.test_subset=10000" in text
    assert not runs.exists() and not out.exists()

    with pytest.raises(SystemExit, match="no seconds per step for sandwich"):
        ablation.main(["--methods", "sandwich", "--calibration", str(cal), "--dry-run", "--runs", str(runs)])


def _run(folder: Path, trainer: dict, latest: int | None, metrics: list[dict]) -> Path:
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"trainer": trainer}), folder / "config.yaml")
    if latest is not None:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "latest").write_text(f"step-{latest:08d}\n")
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return folder


def test_run_state_and_train_seconds_tell_what_a_resumed_study_does_with_each_folder(tmp_path):
    assert ablation.run_state(tmp_path / "none") == "new"
    assert ablation.run_state(_run(tmp_path / "killed-early", {"steps": 10, "epochs": 1}, None, [])) == "broken"
    steps = {"steps": 10, "epochs": 1}
    assert ablation.run_state(_run(tmp_path / "cut", steps, 4, [])) == "partial"
    assert ablation.run_state(_run(tmp_path / "done", steps, 10, [])) == "trained"
    ends = [{"step": 4, "epoch": 0, "loss": 1.0, "time": 1.0}, {"epoch": 1, "step": 8, "time": 2.0}]
    assert ablation.run_state(_run(tmp_path / "epochs-cut", {"steps": None, "epochs": 2}, 8, ends)) == "partial"
    assert ablation.run_state(_run(tmp_path / "epochs-done", {"steps": None, "epochs": 1}, 8, ends)) == "trained"
    resumed = _run(tmp_path / "resumed", steps, 10, [{"step": 2, "time": 1.0}, {"step": 4, "time": 2.5},
                                                     {"step": 6, "time": 0.5}, {"step": 10, "time": 3.0}])
    assert ablation.train_seconds(resumed) == (5.5, 2)  # two processes' clocks, added


def test_differences_are_marked_only_beyond_the_seeds_spread():
    def recs(method, fulls, means):
        return [{"seed": i, "full": f, "weakest": 10.0, "weakest_name": "w", "weakest_rel": 11.0, "mean": m,
                 "corners": {}, "steps": 5, "epochs": 1.0, "train_seconds": 1.0}
                for i, (f, m) in enumerate(zip(fulls, means))]

    summary = ablation.add_gaps([ablation.aggregate("full", 1, recs("full", [90, 91], [30, 31]), []),
                                 ablation.aggregate("sortednet", 1, recs("sortednet", [80, 82], [60, 61]), []),
                                 ablation.aggregate("lossaware", 1, recs("lossaware", [89, 91.5], [61, 62]), [])])
    by = {s["method"]: s for s in summary}
    assert by["sortednet"]["full"]["spread"] == 1.0 and by["sortednet"]["vs_plain"]["diff"] == pytest.approx(-9.5)
    assert by["sortednet"]["vs_plain"]["beyond_spread"]  # -9.5 against 0.5 + 1.0
    assert not by["lossaware"]["vs_plain"]["beyond_spread"]  # -0.25: within the seeds' noise
    assert not by["lossaware"]["mean_vs_sortednet"]["beyond_spread"]  # +1.0 against 0.5 + 0.5
    one = ablation.add_gaps([ablation.aggregate("full", 1, recs("full", [90], [30]), []),
                             ablation.aggregate("sortednet", 1, recs("sortednet", [50], [60]), [])])
    assert not one[1]["vs_plain"]["beyond_spread"]  # one seed: no spread, nothing is called a difference
    assert "± " not in ablation.pm(one[1]["full"]) and ablation.gap(one[1]["vs_plain"]) == "-40.00"


TINY_STUDY = ["--recipe", "ablation_tiny", "--seeds", "0", "--budget", "0.4", "--budget-x", "1",
              "--methods", "full", "lossaware", "--eval-subset", "64", "--calib-steps", "30",
              "--corners", "width0.25-depth1", "width1-depth4",
              "--set", "data=digits", "data.train_subset=256", "data.test_subset=64", "trainer.batch_size=64",
              "trainer.epochs=1", "dims.width.levels=[0.25,0.5,1.0]"]


def _study(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**CLI_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), CLI_ENV.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation.py"), *TINY_STUDY, "--runs", "runs",
                           "--out", "out", *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_tiny_study_calibrates_trains_at_equal_time_evaluates_and_resumes(tmp_path):
    p = _study(tmp_path)
    assert p.returncode == 0, explain(p)
    cal = json.loads((tmp_path / "runs" / "calibration.json").read_text())
    assert cal["steps_per_epoch"] == 4 and set(cal["methods"]) == {"full", "lossaware"}
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(doc["runs"]) == 2 and set(doc["standalone"]) == {"width0.25-depth1", "width1-depth4"}
    for r in doc["runs"]:
        want = max(1, round(0.4 / cal["methods"][r["method"]]["sec_per_step"]))
        run = tmp_path / r["run"]
        assert r["steps"] == want and OmegaConf.load(run / "config.yaml").trainer.steps == want
        assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{want:08d}"
        assert r["epochs"] == want / 4 and r["train_seconds"] > 0 and r["submodels"] == 12
        assert r["corners"]["width1-depth4"]["rel_standalone"] is not None
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| `lossaware` | 4 | 1x |" in table and "One seed: no spread" in table
    assert (tmp_path / "out" / "compare" / "1x" / "plot.png").is_file()

    (tmp_path / r["run"] / "eval" / "results.json").unlink()  # the last run's eval was cut off
    again = _study(tmp_path)
    assert again.returncode == 0, explain(again)
    assert "(cached in runs/calibration.json)" in again.stdout and "all 2 trained (skipped)" in again.stdout
    assert "full 1x seed 0: evaluated (skipped)" in again.stdout
    assert "lossaware 1x seed 0: trained in" in again.stdout  # evaluated again, not trained again
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) == 2
