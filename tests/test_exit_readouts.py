"""Each exit's own readout (``model.exits``, ``nest.add_exit_readouts``): a copy of the final norm
(``norm``) or an affine map before it (``affine``) in place of the shared final norm, read by every path
that reads an exit (the model's forward as a depth-k sub-model, ``run_exits``, the training step's chunked
readout, the decoding stack's head), counted in FLOPs and parameters, cut out by export where a stock
model can hold it, and trained alone on a frozen trunk (``model.exits.trunk=frozen``). Tiny random LLaMAs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli, each_refused, explain, run_folders
from sortedcli import flops
from sortedcli.engine import Distill, train_step
from sortedcli.models import create, entry
from sortedcli.models.decoder import DecoderStack
from sortedcli.nest import EXITS, COUNT, Dim, Grid, SubModel, call, check_equal, extract, run_exits, use
from sortedcli.tasks import CausalLM
from test_llama import QA, tokenizer_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True}
VOCAB, H = 50, 32
LM = CausalLM()
ALL = list(Grid((Dim("depth", COUNT, (1, 2, 3, 4)),)).submodels())
FULL = SubModel.of(depth=4)


def _llama(readout=None, trunk="train", seed=0):
    torch.manual_seed(seed)
    exits = None if readout is None else {"readout": readout, "trunk": trunk}
    return create("llama", vocab_size=VOCAB, config=dict(TINY), exits=exits).eval()


def _moved(model, seed=1):
    """The exits' own readouts moved away from their identity start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.sortednet.exits.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _batch(seed: int, n: int = 4, length: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("readout", ["norm", "affine"])
def test_an_exits_own_readout_starts_as_the_shared_one_and_every_path_reads_it(readout):
    shared, own = _llama(), _llama(readout)
    assert sorted(own.sortednet.exits) == ["1", "2", "3"]  # every exit but the full model
    assert all(k.startswith(EXITS + ".") for k in set(own.state_dict()) - set(shared.state_dict()))
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for k in (1, 3, 4):  # the identity start: every exit reads what the shared readout reads
            with use(own, SubModel.of(depth=k)), use(shared, SubModel.of(depth=k)):
                torch.testing.assert_close(call(own, ids), call(shared, ids), rtol=0, atol=1e-6)
        _moved(own)
        with use(own, FULL):
            by_exit = run_exits(own, ids, [1, 2, 4])
        torch.testing.assert_close(by_exit[4], call(shared, ids), rtol=0, atol=1e-6)  # the full model keeps its own
        stack = DecoderStack(own)
        for k in (1, 2):
            with use(own, SubModel.of(depth=k)):
                alone = call(own, ids)
            with use(shared, SubModel.of(depth=k)):
                assert not torch.allclose(alone, call(shared, ids), atol=1e-3)  # it reads through its own
            torch.testing.assert_close(by_exit[k], alone, rtol=1e-5, atol=1e-5)
            h = stack.layers(stack.embed(ids[:1]), 0, k, stack.new_cache(), torch.arange(7))
            torch.testing.assert_close(stack.head(h, k), alone[:1], rtol=1e-5, atol=1e-5)
            vocab = torch.tensor([3, 9, 20])
            torch.testing.assert_close(stack.vocab_head(vocab)(h, k), alone[:1][..., vocab], rtol=1e-5, atol=1e-5)


def test_flops_and_parameters_count_an_exits_own_readout():
    """An affine exit costs its map: 2 H^2 FLOPs a token more and H^2 + H weights (its own norm stands
    in for the shared one); a norm exit costs what the shared readout costs. The full model is unchanged."""
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    subs = [SubModel.of(depth=k) for k in (1, 2, 3, 4)]
    shared = flops.measure_all(_llama(), subs, ids)
    for readout, extra_flops, extra_params in (("norm", 0, 0), ("affine", 2 * H * H * 7, H * H + H)):
        got = flops.measure_all(_llama(readout), subs, ids)
        for sub in subs:
            full = sub == FULL
            assert got[sub].flops - shared[sub].flops == (0 if full else extra_flops), (readout, sub)
            assert got[sub].params - shared[sub].params == (0 if full else extra_params), (readout, sub)


def test_only_the_exits_the_grid_trains_get_a_readout(tmp_path):
    """model.exits.at (the configs pass the depth dim's levels): readouts at those exits only, the full
    depth keeping the model's own; an exit without one reads the shared readout; the composed configs
    give a 10-exit recipe's levels, and 'all' where no depth is sorted."""
    from sortedcli.build import plain
    from sortedcli.models.decoder import exits_options

    model = create("llama", vocab_size=VOCAB, config=dict(TINY), exits={"readout": "affine", "at": [2, 4]})
    assert sorted(model.sortednet.exits) == ["2"]
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith(EXITS + ".")} == {"2"}
    shared = _llama()
    shared.load_state_dict({k: v for k, v in _moved(model).state_dict().items() if not k.startswith(EXITS)})
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    got, ref = run_exits(model, ids, [1, 2, 4]), run_exits(shared, ids, [1, 2, 4])
    assert torch.equal(got[1], ref[1]) and torch.equal(got[4], ref[4]) and not torch.allclose(got[2], ref[2])
    from test_configs import conf, recipe

    cfg = conf("train", ["model=llama_tiny", "dims=[depth]", "dims.depth.levels=[1,3,4]", "model.exits.readout=norm"])
    assert exits_options(plain(cfg.model)["exits"])["at"] == [1, 3, 4]
    cfg = conf("train", ["model=llama_tiny", "dims=[ffn]", "model.exits.readout=norm"])
    assert exits_options(plain(cfg.model)["exits"])["at"] == "all"
    cfg = recipe("smollm2_soft", ["model.exits.readout=affine"])
    assert exits_options(plain(cfg.model)["exits"])["at"] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    for bad in ([], [0], "some", [1.5], [True]):
        with pytest.raises(Exception, match="model.exits.at must be 'all' or a list of layer counts"):
            exits_options({"readout": "norm", "at": bad})


def test_early_exit_counts_an_exits_own_map_at_every_check():
    """exit_costs' readout: an affine exit's H x H map runs at each check (the mean over the exits); a
    norm exit and the shared readout add nothing; a token's cost counts it once per check."""
    from sortedcli import decoding as D

    assert D.exit_costs(DecoderStack(_llama())).readout == 0
    assert D.exit_costs(DecoderStack(_llama("norm"))).readout == 0
    affine = D.exit_costs(DecoderStack(_llama("affine")), 20)
    assert affine.readout == H * H and affine.check == 20 * H
    assert affine.token(2, 2, 4) - D.exit_costs(DecoderStack(_llama()), 20).token(2, 2, 4) == 2 * H * H


def test_a_norm_exit_is_cut_out_as_a_stock_model_and_an_affine_one_is_not_exportable(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    model, sub = _moved(_llama("norm")), SubModel.of(depth=2)
    plain = extract(model, sub, ids)
    assert type(plain.model.norm).__name__ == "LlamaRMSNorm" and not hasattr(plain, EXITS)
    torch.testing.assert_close(plain.model.norm.weight, model.sortednet.exits["2"].weight, rtol=0, atol=0)
    check_equal(model, sub, plain, ids)
    with torch.no_grad(), use(model, sub):
        want = call(model, ids)
    entry("llama").save(tmp_path / "cut", plain, {"submodel": {"depth": 2}}, ids)  # reloads as the stock class
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cut")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, rtol=1e-4, atol=1e-4)
    affine = _llama("affine")
    assert entry("llama").exportable(model, sub) and entry("llama").exportable(affine, FULL)
    assert not entry("llama").exportable(affine, sub)


def _kl(model, batch, depth) -> float:
    """KL(full || exit ``depth``) at the counted places."""
    counted = batch["labels"][:, 1:] != -100
    with torch.no_grad(), use(model, FULL):
        z = run_exits(model, LM.inputs(batch), [depth, 4])
    p, q = (torch.log_softmax(z[d][:, :-1][counted], -1) for d in (4, depth))
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_a_frozen_trunk_trains_only_the_exits_readouts_toward_the_full_model():
    """``trunk=frozen`` with self-distillation (alpha 1): after 20 steps every weight but the exits'
    readouts is bit-for-bit what it was (the full model answers exactly as before), and each exit's KL
    to the full model on held-out batches fell."""
    model = _llama("affine", trunk="frozen").train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    held = _batch(seed=99, n=8)
    before = {k: _kl(model, held, k) for k in (1, 2, 3)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(20):
        train_step(model, LM, ALL, _batch(seed=step % 5), opt, FULL, Distill(enabled=True, alpha=1.0),
                   torch.device("cpu"), None)
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], start[k])}
    assert moved and all(k.startswith(EXITS + ".") for k in moved)
    assert {k.split(".")[1] for k in moved} == {"1", "2", "3"}
    now = {k: _kl(model.eval(), held, k) for k in (1, 2, 3)}
    assert all(now[k] < before[k] for k in now), (before, now)


def _tiny(tok, qa, *more) -> list[str]:
    return ["model=llama_tiny", f"model.tokenizer={tok}", "data=alpaca", f"data.path={qa}", "data.test_fraction=0.2",
            "dims=[depth]", "sampler=all", "optim=adamw", "optim.lr=0.01", "trainer.batch_size=4",
            "trainer.log_every=1", "trainer.epoch_eval=false", "eval.batch_size=8", "distill.enabled=true",
            "distill.alpha=1", "model.exits.readout=affine", "model.exits.trunk=frozen", *more]


def _latest(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip() / "model.safetensors"


def test_cli_trains_exits_on_a_frozen_trunk_resumes_evals_generates_and_exports_the_full_model(tokenizer_dir,
                                                                                               tmp_path):
    from safetensors.torch import load_file

    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(QA))
    p = cli(["train", *_tiny(tokenizer_dir, qa, "trainer.max_steps=2")], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "runs")[0]
    first = load_file(str(_latest(run)))
    p = cli(["train", "--resume", run, "trainer.max_steps=3"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    last = load_file(str(_latest(run)))
    assert set(first) == set(last) and any(k.startswith(EXITS + ".") for k in last)
    moved = {k for k in last if not torch.equal(first[k], last[k])}
    assert moved and all(k.startswith(EXITS + ".") for k in moved)  # the resumed step trained the readouts only
    p = cli(["eval", "--all-submodels", "eval.latency.reps=2", "eval.latency.warmup=1"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["perplexity"] > 1 for r in rows)
    texts = []
    for flags in ([], ["--speculative", "--draft-exit", "2"]):
        g = cli(["generate", *flags, "--max-tokens", "8", "What is 2 plus 2?"], cwd=tmp_path)
        assert g.returncode == 0, explain(g)
        texts.append(g.stdout)
    assert texts[0] == texts[1]  # drafting with exit 2's own readout, verified by the full model
    # benchmarks/decoding.py decodes the run itself (its exits' own readouts), not a plain folder of it
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decoding.py"
    spec = importlib.util.spec_from_file_location("bench_decoding_exit_readouts", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--model", str(run), "--prompts", "2", "--new-tokens", "6", "--reps", "1", "--ppl-items", "2",
                          "--draft-exits", "2", "--draft-vocab", "0", "--threads", "1", "--out", str(tmp_path / "d.json")])
    assert "the run's model" in results["model"]
    assert results["methods"]["speculative, draft exit 2 (ours)"]["identical"] == 2
    p = cli(["export", "--budget", "0.8"], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, explain(p)  # every exit within the budget is affine
    assert "within --budget 0.8 can be written as a Hugging Face folder (AutoModelForCausalLM) (an exit with its " \
        "own affine readout" in p.stderr
    assert not (run / "export" / "budget-0.8").exists()
    p = cli(["export", "--budget", "1"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    config = json.loads((run / "export" / "budget-1" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4


BAD = {
    "unknown-readout": (["model.exits.readout=afine"], "model.exits.readout must be one of shared, norm, affine"),
    "unknown-trunk": (["model.exits.trunk=frozn"], "model.exits.trunk must be one of train, frozen"),
    "frozen-shared": (["model.exits.trunk=frozen"], "set model.exits.readout=norm or affine"),
    "frozen-lora": (["model.exits.readout=norm", "model.exits.trunk=frozen", "model.lora.r=4"],
                    "model.exits.trunk=frozen and model.lora both choose what trains"),
    "frozen-no-exit": (["model.exits.readout=affine", "model.exits.trunk=frozen", "dims=[ffn]"],
                       "no sub-model of dims reads one: sort along depth"),
    "frozen-only-full-depth": (["model.exits.readout=norm", "model.exits.trunk=frozen", "dims.depth.levels=[4]"],
                               "no sub-model of dims reads one: sort along depth"),
    "at-not-a-list": (["model.exits.readout=norm", "model.exits.at=some"],
                      "model.exits.at must be 'all' or a list of layer counts"),
    "unknown-key": (["+model.exits.head=own"], "unknown key model.exits.head: model.exits has at, readout, trunk"),
}


def test_bad_exit_readout_settings_are_one_line_exit_2_and_write_nothing(tmp_path):
    def one(case):
        folder = tmp_path / case
        folder.mkdir()
        return cli(["train", "model=llama_tiny", "data=hamlet", "dims=[depth]", "trainer.max_steps=1", *BAD[case][0]],
                   cwd=folder), folder

    each_refused(BAD, one)
