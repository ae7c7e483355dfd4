"""Self-distillation for a language model's exits (issue 21, item 2): KL(teacher || exit) at the counted
places, chunk by chunk (``engine.exit_losses``); the teacher is the same step's full model (``self``) or
a frozen copy of the starting model (``initial``), which can also anchor the full model
(``distill.anchor``); a run keeps its starting weights so that a resume rebuilds the same teacher, and
``eval`` reports each exit's agreement with them. Tiny random LLaMAs throughout."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CLI_ENV, cli, each_refused, explain, run_folders
from sortedcli import engine
from sortedcli.engine import Distill, frozen_copy, train_step
from sortedcli.models import create
from sortedcli.nest import COUNT, Dim, Grid, SubModel, run_exits, use
from sortedcli.tasks import CausalLM

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}
VOCAB = 96
LM = CausalLM()
GRID = Grid((Dim("depth", COUNT, (1, 2, 3, 4)),))
FULL = GRID.largest
SUBS = {"all": [*GRID.submodels()],  # the full model among them: in-place teacher read in the same chunk
        "sampled": [SubModel.of(depth=3), SubModel.of(depth=1)]}  # no full model: its states read apart
CPU = torch.device("cpu")


def _llama(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create("llama", vocab_size=VOCAB, config=dict(TINY)).to(dtype).train()


def _batch(seed: int = 1, n: int = 4, length: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    labels[2, 6:8] = -100  # a hole inside an answer
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _kl_by_hand(student, teacher, counted, T):
    """KL(teacher || student) x T^2, averaged over the counted places, from every place's logits."""
    s = torch.log_softmax(student[:, :-1][counted].float() / T, -1)
    q = torch.log_softmax(teacher[:, :-1][counted].float() / T, -1)
    return (q.exp() * (q - s)).sum(-1).mean() * T * T


def _reference(model, subs, batch, distill: Distill, teacher=None) -> tuple[float, dict]:
    """The step's loss and gradients written out by hand over every place's logits (no gathering, no
    chunks): each exit's cross-entropy and KL over the counted places, mixed as ``distill`` says."""
    model.zero_grad(set_to_none=True)
    inputs, T = LM.inputs(batch), distill.temperature
    labels = batch["labels"][:, 1:]
    counted = labels != -100
    depths = sorted({s["depth"] for s in subs})
    with use(model, SubModel.of(depth=max(depths))):
        logits = run_exits(model, inputs, depths)
    with torch.no_grad():
        if teacher is not None:
            ref = teacher(**inputs).logits
        else:
            with use(model, FULL):
                ref = model(**inputs).logits
    total = 0.0
    for sub in subs:
        z = logits[sub["depth"]]
        ce = F.cross_entropy(z[:, :-1][counted].float(), labels[counted])
        if sub == FULL:
            one = (0.0 if distill.anchor_only else ce) + distill.anchor * _kl_by_hand(z, ref, counted, T)
        else:
            one = distill.alpha * _kl_by_hand(z, ref, counted, T) + (1 - distill.alpha) * ce
        total = total + one
    (total / len(subs)).backward()
    return float(total.detach()) / len(subs), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = {"self": dict(teacher="self"), "initial": dict(teacher="initial"),
         "initial-anchor": dict(teacher="initial", anchor=1.5),
         "initial-anchor-only": dict(teacher="initial", anchor=1.5, anchor_only=True)}


@pytest.mark.parametrize("sampler", sorted(SUBS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_kl_equals_the_kl_of_every_places_logits(monkeypatch, case, sampler):
    """Within 1e-6: the training step's distillation, read out 5 counted places at a time (31 of them: 7
    chunks, the last one short), has the loss and the gradients of the hand-written full-logits KL."""
    monkeypatch.setattr(engine, "HEAD_CHUNK", 5)
    model, batch = _llama(), _batch()
    teacher = None
    if CASES[case]["teacher"] == "initial":  # another model than the student: its own seed
        teacher = frozen_copy(_llama(seed=3))
    distill = Distill(enabled=True, temperature=2.0, alpha=0.7, model=teacher, **CASES[case])
    want_loss, want = _reference(model, SUBS[sampler], batch, distill, teacher)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    loss = train_step(model, LM, SUBS[sampler], batch, torch.optim.SGD(model.parameters(), lr=0.0), FULL, distill,
                      CPU, None)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert loss == pytest.approx(want_loss, abs=1e-6, rel=1e-6)
    assert set(got) == set(want)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max(seen) <= 5  # no readout of more than a chunk: the teacher's neither
    # the distillation changed the loss (the comparison above could fail)
    other = _llama()
    plain = train_step(other, LM, SUBS[sampler], batch, torch.optim.SGD(other.parameters(), lr=0.0), FULL,
                       Distill(), CPU, None)
    assert abs(plain - loss) > 1e-3


@pytest.mark.parametrize("anchor_only", [False, True])
def test_the_logits_path_distils_from_the_frozen_teacher_and_anchors_alike(monkeypatch, anchor_only):
    """FSDP's shards keep the whole-logits path: the same loss as the chunked one, anchor included."""
    teacher = frozen_copy(_llama(seed=3))
    distill = Distill(enabled=True, temperature=2.0, alpha=0.7, teacher="initial", anchor=1.5, anchor_only=anchor_only,
                      model=teacher)
    batch, losses = _batch(), []
    for whole in (False, True):
        if whole:  # as when the exits cannot be read apart
            monkeypatch.setattr(engine, "has_exits", lambda model: False)
        model = _llama()
        losses.append(train_step(model, LM, SUBS["all"], batch, torch.optim.SGD(model.parameters(), lr=0.0), FULL,
                                 distill, CPU, None))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def _train(model, distill, steps: int, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        train_step(model, LM, SUBS["all"], _batch(seed=100 + step % 4, n=8, length=16), opt, FULL, distill, CPU, None)


def test_the_initial_teacher_stays_frozen_while_the_student_moves():
    model = _llama()
    teacher = frozen_copy(model)
    before = copy.deepcopy(teacher.state_dict())
    start = copy.deepcopy(model.state_dict())
    _train(model, Distill(enabled=True, teacher="initial", anchor=1.0, model=teacher), steps=3)
    assert not teacher.training and not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    moved = [n for n, v in model.state_dict().items() if not torch.equal(v, start[n])]
    assert len(moved) == len(start)  # every weight of the student trained


@torch.no_grad()
def _agreement(model, teacher, seeds=range(200, 204)) -> float:
    """Top-1 agreement of ``model``'s full model with ``teacher`` at the counted places of held-out batches."""
    same = total = 0
    for seed in seeds:
        batch = _batch(seed=seed, n=8, length=16)
        counted = batch["labels"][:, 1:] != -100
        got = model.eval()(**LM.inputs(batch)).logits[:, :-1][counted].argmax(-1)
        want = teacher(**LM.inputs(batch)).logits[:, :-1][counted].argmax(-1)
        same, total = same + int((got == want).sum()), total + int(counted.sum())
    return same / total


def _counting(seed: int) -> dict:
    """A batch of sequences that count up by one from a random start: a next token the model can learn."""
    batch = _batch(seed=seed, n=8, length=16)
    ids = (batch["input_ids"][:, :1] + torch.arange(16)) % VOCAB
    return {**batch, "input_ids": ids, "labels": ids.masked_fill(batch["labels"] == -100, -100)}


def test_the_anchor_keeps_the_full_model_closer_to_the_starting_model():
    """A starting model that predicts something (30 steps on counting sequences; a random init's near-uniform
    predictions would make the argmax meaningless), then 10 SoFT steps on random tokens with the same seed,
    data and teacher: with anchor=1 its full model agrees with the starting model on more held-out places
    than without (measured: 0.87 vs 0.51), and closer still with the anchor alone (``anchor_only``, no
    cross-entropy on the random tokens: measured 0.99)."""
    start = _llama()
    opt = torch.optim.AdamW(start.parameters(), lr=1e-2)
    for step in range(30):
        train_step(start, LM, [FULL], _counting(step), opt, FULL, Distill(), CPU, None)
    out = {}
    for anchor, only in ((0.0, False), (1.0, False), (1.0, True)):
        model = copy.deepcopy(start)
        teacher = frozen_copy(start)
        _train(model, Distill(enabled=True, teacher="initial", anchor=anchor, anchor_only=only, alpha=0.5,
                              model=teacher), steps=10, lr=1e-2)
        out["only" if only else anchor] = _agreement(model, teacher)
    assert out[1.0] > out[0.0] + 0.2, out
    assert out["only"] > out[1.0] + 0.05, out


def test_eval_agreement_with_the_untouched_model_is_counted_at_the_counted_places():
    """``eval``'s agreement_initial: the fraction of counted places where the run's exit predicts the untouched
    model's token, by hand from every place's logits; the untouched model agrees with itself everywhere."""
    from types import SimpleNamespace

    from sortedcli.commands.eval import untouched_agreement

    model, base = _llama().eval(), _llama(seed=3).eval()
    test = [_batch(seed=s, n=3, length=10) for s in (7, 8)]
    r = SimpleNamespace(model=model, data=SimpleNamespace(task=LM), device=CPU, amp=None)
    got = untouched_agreement(r, base, [1, 3, 4], test)
    same = {x: 0 for x in (1, 3, 4)}
    total = 0
    with torch.no_grad():
        for batch in test:
            counted = batch["labels"][:, 1:] != -100
            want = base(**LM.inputs(batch)).logits[:, :-1][counted].argmax(-1)
            with use(model, FULL):
                logits = run_exits(model, LM.inputs(batch), [1, 3, 4])
            for x in same:
                same[x] += int((logits[x][:, :-1][counted].argmax(-1) == want).sum())
            total += int(counted.sum())
    assert got == pytest.approx({x: same[x] / total for x in same}, rel=1e-6) and sum(same.values()) > 0
    r.model = base
    assert untouched_agreement(r, base, [4], test) == {4: 1.0}


# --- the CLI: a pretrained tiny LLaMA with a tokenizer of its own, Alpaca pairs ----------------------

CORPUS = ["The cat sat on the mat. The dog sat on the log. " * 4,
          "Two plus three is five, and five plus five is ten. " * 4] * 4
QA = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
      for a in range(6) for b in range(3)]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A pretrained-style folder (a random tiny LlamaForCausalLM saved with save_pretrained, and its
    tokenizer) and an Alpaca file."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sortedcli.data import lm

    root = tmp_path_factory.mktemp("selfdistill")
    lm.train_tokenizer(CORPUS, 300, root / "tok")
    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **{**TINY, "max_position_embeddings": 256})
    LlamaForCausalLM(config).save_pretrained(str(root / "pretrained"))
    tok.save_pretrained(str(root / "pretrained"))
    (root / "qa.json").write_text(json.dumps(QA))
    return root


def _args(home, pretrained, steps: int) -> list[str]:
    return ["model=llama", f"model.pretrained={pretrained}", "data=alpaca", f"data.path={home / 'qa.json'}",
            "data.test_fraction=0.2", "dims=[depth]", "sampler=all", "optim=adamw", "trainer.batch_size=4",
            "trainer.steps=4", f"trainer.max_steps={steps}", "trainer.ckpt_every=1", "trainer.log_every=1", "trainer.epoch_eval=false",
            "eval.batch_size=8", "distill.enabled=true", "distill.teacher=initial", "distill.anchor=1",
            "distill.alpha=0.5"]


def _losses(run) -> list[float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_cli_trains_resumes_from_its_own_starting_weights_and_evals(home, tmp_path):
    """train 2 steps with the frozen starting model as teacher and anchor; the pretrained folder moves away;
    the resume rebuilds the teacher from the run's own copy of the starting weights and its steps 3-4 have
    the losses of an uninterrupted 4-step run; eval reports each exit's agreement with the untouched model."""
    from safetensors.torch import load_file

    moved = tmp_path / "moved-away"
    shutil.copytree(home / "pretrained", moved)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # the uninterrupted run, beside the interrupted one (two CPU processes)
    whole = subprocess.Popen([sys.executable, "-m", "sortedcli.cli", "train", *_args(home, home / "pretrained", 4)],
                             cwd=tmp_path / "b", env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = cli(["train", *_args(home, moved, 2)], cwd=tmp_path / "a")
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "a" / "runs")[0]
    kept = load_file(str(run / "pretrained" / "initial.safetensors"))
    start = load_file(str(home / "pretrained" / "model.safetensors"))
    assert set(kept) == set(start) and all(torch.equal(kept[k], start[k]) for k in start)  # the starting weights
    shutil.rmtree(moved)  # from here the run has only its own copy
    p = cli(["train", "--resume", run, "trainer.max_steps=4"], cwd=tmp_path / "a")
    assert p.returncode == 0, explain(p)
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]
    want = _losses(run_folders(tmp_path / "b" / "runs")[0])
    assert len(want) == 4 and _losses(run) == pytest.approx(want, rel=1e-5)
    e = cli(["eval", "--all-submodels", "--ckpt", run, "eval.latency.reps=2", "eval.latency.warmup=1",
             "eval.samples=1", "eval.sample_tokens=2"], cwd=tmp_path / "a")
    assert e.returncode == 0, explain(e)
    assert "agreement with the untouched model" in e.stdout
    rows = {r["dims"]["depth"]: r for r in json.loads((run / "eval" / "results.json").read_text())["rows"]}
    assert set(rows) == {1, 2, 3, 4} and all(0 <= rows[x]["agreement_initial"] <= 1 for x in rows)
    line = next(x for x in e.stdout.splitlines() if "agreement with the untouched model" in x)
    assert f"full model {rows[4]['agreement_initial']:.3f}" in line


def test_eval_reads_the_untouched_model_of_a_run_started_from_a_hub_id_at_its_commit(home, tmp_path):
    """A run started from a hub id (here served offline by a Hugging Face cache laid out as the hub
    writes it) keeps no copy of its starting weights, only the commit it read: eval reads that commit
    again from the cache and reports each exit's agreement with the untouched model, the same after the
    hub's ``main`` has moved on to other weights; with the commit gone from the cache it skips the measure."""
    from transformers import AutoConfig, LlamaForCausalLM

    repo = tmp_path / "hub" / "models--tiny--llama"
    shutil.copytree(home / "pretrained", repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {**CLI_ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    args = [a for a in _args(home, "tiny/llama", 1) if not a.startswith("distill.")]
    p = cli(["train", *args], cwd=tmp_path, env=env)
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "runs")[0]
    assert not (run / "pretrained" / "initial.safetensors").exists()
    assert json.loads((run / "pretrained" / "sortednet-pretrained.json").read_text()) == \
        {"pretrained": "tiny/llama", "revision": "0123abcd"}
    evaluate = ["eval", "--all-submodels", "--ckpt", run, "eval.latency.reps=2", "eval.latency.warmup=1",
                "eval.samples=1", "eval.sample_tokens=2"]

    def agreement_initial() -> dict[int, float] | None:
        e = cli(evaluate, cwd=tmp_path, env=env)
        assert e.returncode == 0, explain(e)
        rows = {r["dims"]["depth"]: r for r in json.loads((run / "eval" / "results.json").read_text())["rows"]}
        if "agreement with the untouched model" not in e.stdout:
            assert not any("agreement_initial" in r for r in rows.values())
            return None
        return {x: r["agreement_initial"] for x, r in rows.items()}

    first = agreement_initial()
    assert first is not None and set(first) == {1, 2, 3, 4} and all(0 <= a <= 1 for a in first.values())
    torch.manual_seed(7)  # the hub's main moves on to other weights
    LlamaForCausalLM(AutoConfig.from_pretrained(str(home / "pretrained"))).save_pretrained(
        str(repo / "snapshots" / "fedcba98"))
    (repo / "refs" / "main").write_text("fedcba98")
    assert agreement_initial() == first
    shutil.rmtree(repo / "snapshots" / "0123abcd")
    assert agreement_initial() is None


BAD = {
    "random-init": (["model=llama_tiny", "distill.enabled=true", "distill.teacher=initial"],
                    "starts from a random init: pass model.pretrained=DIR"),
    "anchor-without-initial": (["model=llama_tiny", "distill.enabled=true", "distill.anchor=1"],
                               "distill.anchor=1 holds the full model to the starting model: it needs "
                               "distill.teacher=initial"),
    "anchor-only-without-anchor": (["model=llama_tiny", "model.pretrained=/somewhere", "distill.enabled=true",
                                    "distill.teacher=initial", "distill.anchor_only=true"],
                                   "distill.anchor_only=true trains the full model on the anchor alone: it needs "
                                   "distill.anchor > 0"),
    "unknown-teacher": (["model=llama_tiny", "distill.enabled=true", "distill.teacher=teachr"],
                        "distill.teacher must be self (the same step's full model) or initial"),
    "teacher-without-distill": (["model=llama_tiny", "model.pretrained=/somewhere", "distill.teacher=initial"],
                                "add distill.enabled=true"),
}


def test_bad_distillation_settings_are_one_line_exit_2_and_write_nothing(tmp_path):
    def one(case):
        folder = tmp_path / case
        folder.mkdir()
        return cli(["train", "data=hamlet", "dims=[depth]", *BAD[case][0]], cwd=folder), folder

    each_refused(BAD, one)
