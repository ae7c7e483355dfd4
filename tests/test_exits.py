"""A language model's exits: distinct sub-models only (heads levels that keep the same key/value
groups are one sub-model), the draft exit chosen from the trained exits and the eval's measurements,
and a draft that reads out through a frequency-ranked slice of the vocabulary."""

from __future__ import annotations

import pytest
import torch

from sortedcli.models import create
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel, call, resolved, use

# 9 query heads in 3 key/value groups (SmolLM2-135M's proportions), head_dim 8.
NINE_THREE = {"hidden_size": 72, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 8, "max_position_embeddings": 128,
              "tie_word_embeddings": True}
HEADS = (0.25, 0.5, 0.75, 1.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def nine_three():
    torch.manual_seed(0)
    return create("llama", vocab_size=97, config=dict(NINE_THREE)).eval()


def _grid(model):
    return Grid((Dim("depth", COUNT, (1, 2, 3, 4)), Dim("heads", FRACTION, HEADS))).distinct(
        lambda sub: resolved(model, sub))


def test_heads_levels_keep_whole_kv_groups_and_equal_slices_are_one_submodel(nine_three):
    grid = _grid(nine_three)
    attn = nine_three.model.layers[0].self_attn
    kept = {}
    for level in HEADS:  # ceil(level x 3) key/value heads, each with its 3 query heads
        with use(nine_three, SubModel.of(depth=4, heads=level)):
            kept[level] = (attn.k_proj.out_size(24) // 8, attn.q_proj.out_size(72) // 8)
    assert kept == {0.25: (1, 3), 0.5: (2, 6), 0.75: (3, 9), 1.0: (3, 9)}
    assert len(grid) == 12 and len(grid.duplicates) == 4
    names = [s.name for s in grid]
    assert not any("heads0.75" in n for n in names) and grid.largest.name in names
    assert grid.duplicates_note() == "12 distinct sub-models (4 duplicates dropped: heads 0.75 = 1)"
    assert grid.parse("depth2-heads0.75").name == "depth2-heads1"
    # the dropped one really computes the same, and its neighbour does not
    ids = torch.randint(0, 97, (1, 7))
    out = {}
    for level in HEADS:
        with torch.no_grad(), use(nine_three, SubModel.of(depth=4, heads=level)):
            out[level] = call(nine_three, ids)
    assert torch.equal(out[0.75], out[1.0]) and not torch.allclose(out[0.5], out[1.0])


# --- a cheaper draft: the head over a frequency-ranked subset of the vocabulary --------------------

from test_decoding import VOCAB, decoding_benchmark_on_a_tiny_folder, prompts, tiny_llama  # noqa: E402

from sortedcli import decoding as D  # noqa: E402
from sortedcli.models.decoder import DecoderStack  # noqa: E402


@pytest.fixture(scope="module")
def calm():
    return tiny_llama(calm_depth=0.3)


def test_frequent_tokens_ranks_by_count_then_id():
    got = D.frequent_tokens([[5, 5, 3, 7], torch.tensor([3, 5, 9, 9, 9])], 4, vocab_size=12)
    assert got.tolist() == [5, 9, 3, 7]  # 5 three times, 9 three times (5 < 9), then 3, then 7
    assert D.frequent_tokens([[1]], 4, vocab_size=3).tolist() == [1, 0, 2]  # unseen ids fill in id order


def test_a_subset_heads_logits_are_the_full_heads_logits_at_those_ids(calm):
    stack = DecoderStack(calm)
    vocab = torch.tensor([7, 3, 40, 12, 59])
    h = torch.randn(1, 3, 32, dtype=torch.float64)
    assert torch.allclose(stack.vocab_head(vocab)(h), stack.head(h)[..., vocab], rtol=0, atol=1e-12)


@pytest.mark.parametrize("check_first", [0.0, 1.0])
def test_greedy_speculative_with_a_draft_vocabulary_is_plain_greedy(calm, check_first):
    stack = DecoderStack(calm)
    train = [p.tolist() for p in prompts(20, seed=5)]
    vocab = D.frequent_tokens(train, 24, VOCAB)  # 24 of 61 tokens: some of the full model's choices are outside
    outside = 0
    for prompt in prompts(6):
        want = D.generate(stack, prompt, max_new_tokens=20).tokens
        outside += sum(t not in vocab.tolist() for t in want)
        for E in (1, 3, 5):
            got = D.speculative(stack, prompt, draft_exit=E, max_new_tokens=20, draft_vocab=vocab,
                                check_first=check_first)
            assert got.tokens == want, (E, check_first)
    assert outside > 0  # the subset really cuts tokens the full model emits; verification restores them


def test_a_rejected_round_costs_greedys_step_plus_the_drafts():
    """On a model whose shallow exits disagree with it (random, no calming), checking the first draft
    alone keeps the layer passes within greedy's plus the drafts' (k x c); one joint verify pass of
    k+1 tokens after every rejected round does not."""
    model = tiny_llama(seed=3)
    stack = DecoderStack(model)
    E = 2
    for prompt in prompts(4, seed=9):
        greedy = D.generate(stack, prompt, max_new_tokens=24)
        split = D.speculative(stack, prompt, draft_exit=E, max_new_tokens=24, k=4, check_first=1.0, fallback=False)
        joint = D.speculative(stack, prompt, draft_exit=E, max_new_tokens=24, k=4, check_first=0.0, fallback=False)
        assert split.tokens == joint.tokens == greedy.tokens
        assert split.acceptance < 0.5
        assert split.layer_passes <= greedy.layer_passes + split.drafted * E
        assert joint.layer_passes > greedy.layer_passes + joint.drafted * E


# --- the draft exit from the trained exits and the eval's measurements ----------------------------

import json  # noqa: E402

from conftest import cli, explain, run_folders  # noqa: E402
from sortedcli import draft  # noqa: E402
from sortedcli.data import lm  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def test_predicted_speedup_and_best_k_follow_the_bound():
    assert draft.speedup(0.0, 0.3, 1) == pytest.approx(1 / 1.3)
    assert draft.speedup(0.8, 0.25, 3) == pytest.approx((1 - 0.8 ** 4) / (0.2 * 1.75))
    k, s = draft.best_k(0.8, 0.25)
    assert s == max(draft.speedup(0.8, 0.25, j) for j in range(1, 17)) and 2 <= k <= 8
    # low agreement and a costly exit: no k helps, the best is k=1 and below 1
    assert draft.best_k(0.05, 0.42) == (1, pytest.approx(1.05 / 1.42))
    got = draft.choose({1: 0.2, 2: 0.9, 3: 0.95}, {1: 0.3, 2: 0.55, 3: 0.8}, full=4)
    assert got["exit"] == 2 and got["speedup"] == max(draft.best_k(a, c)[1] for a, c in
                                                        [(0.2, 0.3), (0.9, 0.55), (0.95, 0.8)])
    # verification priced as measured (CPU-like: 2 tokens 1.7x one, 9 tokens 2.1x): interpolated, and
    # the prediction falls below the verify-is-free bound (and the best k moves: a costly pass is
    # amortized over more drafts)
    v = {1: 1.0, 2: 1.7, 3: 1.8, 5: 1.9, 9: 2.1, 17: 2.9}
    assert draft.verify_cost(v, 4) == pytest.approx(1.85) and draft.verify_cost(v, 7) == pytest.approx(2.0)
    assert draft.verify_cost(v, 34) == pytest.approx(5.8) and draft.verify_cost(None, 5) == 1.0
    assert draft.speedup(0.8, 0.25, 3, v) == pytest.approx((1 - 0.8 ** 4) / (0.2 * (0.75 + 1.85)))
    k_free, s_free = draft.best_k(0.8, 0.25)
    k_cpu, s_cpu = draft.best_k(0.8, 0.25, verify=v)
    assert s_cpu < s_free and k_cpu != k_free
    assert draft.choose({2: 0.9}, {2: 0.55}, full=4, verify=v)["speedup"] == pytest.approx(s := draft.best_k(0.9, 0.55, verify=v)[1]) and s > 0


def test_verify_ratios_time_every_size_and_never_price_more_tokens_below_one():
    """The measured verification prices (interleaved rounds, medians): one per size, 1 for a single
    token, and no size priced below it (doing more work cannot be cheaper: that is noise)."""
    v = draft.verify_ratios(DecoderStack(tiny_llama(seed=1)), sizes=(1, 2, 5), warmup=1, reps=3)
    assert list(v) == [1, 2, 5] and v[1] == 1.0 and min(v[2], v[5]) >= 1.0
    ms = draft.verify_ratios(DecoderStack(tiny_llama(seed=1)), sizes=(1, 2), warmup=1, reps=3, ms=True)
    assert list(ms) == [1, 2] and all(0 < t < 10_000 for t in ms.values())  # the medians, in milliseconds


def test_drafting_gives_up_below_the_acceptance_at_which_it_breaks_even():
    """draft.break_even: the lowest a whose best predicted speed-up reaches 1 (a cheap draft pays at a
    low acceptance, a dear one needs a high one, one dearer than a step never pays); speculative takes
    it as give_up and refuses a rate outside [0, 1]."""
    v = {1: 1.0, 2: 1.09, 3: 1.13, 5: 1.61, 9: 1.93, 17: 1.97}  # SmolLM2 on 2 quiet cores
    cheap, dear = draft.break_even(0.09, v), draft.break_even(0.75, v)
    assert 0.15 < cheap < 0.2 and 0.8 < dear < 0.9
    assert draft.best_k(cheap, 0.09, verify=v)[1] == pytest.approx(1, abs=1e-6)
    assert draft.best_k(cheap - 0.01, 0.09, verify=v)[1] < 1 < draft.best_k(cheap + 0.01, 0.09, verify=v)[1]
    assert draft.break_even(1.2, v) is None
    # what generate and the benchmark pass: the break-even, else (unmeasured, never pays) the default
    assert draft.give_up(0.09, v) == cheap and draft.give_up(1.2, v) == D.GIVE_UP == draft.give_up(None, None)
    assert draft.as_ratios({1: 40.0, 2: 44.0, 5: 38.0}) == {1: 1.0, 2: pytest.approx(1.1), 5: 1.0}
    with pytest.raises(ValueError, match="give_up must be an acceptance rate"):
        D.speculative(DecoderStack(tiny_llama()), [1, 2], draft_exit=1, give_up=1.5)


def test_early_exit_thresholds_land_on_the_trained_exits():
    assert D.scaled_thresholds(30) == {9: 0.95, 12: 0.95, 15: 0.9, 18: 0.9, 21: 0.8, 24: 0.8, 27: 0.7}
    got = D.scaled_thresholds(30, exits=[8, 16, 24, 30])
    assert set(got) <= {8, 16, 24} and got == {8: 0.95, 16: 0.95, 24: 0.8}  # 12 ties 8/16: the deeper; the strictest where two land
    assert D.scaled_thresholds(30, exits=[30]) == {}


CORPUS = ["The cat sat on the mat. The dog sat on the log. " * 4,
          "Two plus three is five, and five plus five is ten. " * 4] * 6


@pytest.mark.slow
def test_eval_measures_each_exit_and_generate_drafts_from_its_choice(tmp_path):
    lm.train_tokenizer(CORPUS, 300, tmp_path / "tok")
    (tmp_path / "text.txt").write_text("\n\n".join(CORPUS))
    p = cli(["train", "model=llama_tiny", f"model.tokenizer={tmp_path / 'tok'}", "data=corpus",
             f"data.path={tmp_path / 'text.txt'}", "data.block_size=32", "data.doc_chars=120",
             "data.test_fraction=0.3", "dims=[depth]", "dims.depth.levels=[1,3,4]",
             "sampler=all", "optim=adamw", "trainer.batch_size=4", "trainer.max_steps=2", "trainer.ckpt_every=1",
             "eval.batch_size=8"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "runs")[0]
    g = cli(["generate", "--speculative", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert g.returncode == 0, explain(g)
    assert "draft exit 1: the shallowest exit the run trained" in g.stderr and "draft exit 1 of 4" in g.stderr
    g = cli(["generate", "--early-exit", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert g.returncode == 0 and "thresholds {1: 0.95, 3: 0.95}" in g.stderr, explain(g)
    p = cli(["eval", "--all-submodels", "eval.latency.reps=3"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    doc = json.loads((run / "eval" / "results.json").read_text())
    rows = {r["dims"]["depth"]: r for r in doc["rows"]}
    for e in (1, 3):
        assert 0 <= rows[e]["agreement"] <= 1 and rows[e]["cost_ratio"] > 0
    chosen = doc["draft"]
    verify = {int(t): x for t, x in chosen["verify"].items()}
    assert verify[1] == 1 and all(x > 0 for x in verify.values())
    for e in (1, 3):  # predicted on the full model's own answers, the text drafts meet
        assert 0 <= rows[e]["agreement_own_text"] <= 1
        assert rows[e]["speedup"] == pytest.approx(draft.best_k(rows[e]["agreement_own_text"], rows[e]["cost_ratio"],
                                                                verify=verify)[1])
    assert "agreement" not in rows[4]
    for e in (1, 3):  # the vocabulary is 300 tokens: no frequency-ranked subset (4096+) is smaller
        assert not any(key.startswith("vocab") for key in rows[e])
    ranks = load_file(str(run / "eval" / "token-ranks.safetensors"))["ids"]
    assert sorted(ranks.tolist()) == list(range(ranks.numel()))
    chosen = doc["draft"]
    assert chosen["vocab"] is None and chosen["exit"] in (1, 3) and chosen["speedup"] == max(rows[e]["speedup"] for e in (1, 3))
    assert chosen["agreement"] == rows[chosen["exit"]]["agreement_own_text"]
    assert chosen["agreement_reference"] == rows[chosen["exit"]]["agreement"]
    assert "agreement on the full model's own answers" in p.stdout
    assert set(chosen["samples"]) == {"1", "3", "4"} and all(len(v) == 3 for v in chosen["samples"].values())
    g = cli(["generate", "--speculative", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert g.returncode == 0, explain(g)
    assert f"draft exit {chosen['exit']}, k={chosen['k']}: chosen by `sortednet eval`" in g.stderr
    plain = cli(["generate", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert plain.stdout == g.stdout
    # an older checkpoint drafts by its own measurements (none here), not by the latest's
    old = cli(["generate", "--speculative", "--ckpt", str(run / "checkpoints" / "step-00000001"), "--max-tokens", "6",
               "The cat"], cwd=tmp_path)
    assert old.returncode == 0 and "the shallowest exit the run trained" in old.stderr, explain(old)
    v = cli(["generate", "--speculative", "draft_vocab=40", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert v.returncode == 0 and v.stdout == plain.stdout and "draft vocab 40" in v.stderr, explain(v)
    # export refuses a sub-model far below the full model unless forced
    x = cli(["export", "--budget", "0.6", "min_relative=101"], cwd=tmp_path)
    assert x.returncode == 2 and x.stderr.count("\n") == 1 and "force=true" in x.stderr, explain(x)
    assert not (run / "export").exists()
    x = cli(["export", "--budget", "0.6", "min_relative=101", "force=true"], cwd=tmp_path)
    assert x.returncode == 0 and (run / "export" / "budget-0.6" / "config.json").is_file(), explain(x)
    # eval.samples=0: the draft is chosen and no samples are written (it raised IndexError)
    e = cli(["eval", "--all-submodels", "--ckpt", str(run / "checkpoints" / "step-00000001"), "eval.samples=0",
             "eval.latency.reps=3"], cwd=tmp_path)
    assert e.returncode == 0, explain(e)
    doc = json.loads((run / "eval" / "step-00000001" / "results.json").read_text())
    assert doc["draft"]["exit"] in (1, 3) and doc["draft"]["samples"] == {}


def test_decoding_benchmark_prints_verify_costs_and_drafts_through_a_vocabulary_subset(tmp_path, capsys):
    bench, folder = decoding_benchmark_on_a_tiny_folder(tmp_path)
    results = bench.main(["--model", str(folder), "--prompts", "2", "--new-tokens", "8", "--reps", "1", "--no-ppl",
                          "--draft-exits", "2", "--draft-vocab", "64", "--threads", "1", "--out", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert "verify cost, full model step of T tokens: T=1:" in printed and "prompt 2/2 done" in printed
    sub = results["methods"]["speculative, draft exit 2, vocab 64 (ours)"]
    assert sub["identical"] == 2 and 0 <= sub["a"] <= 1
    assert set(results["c_step"]["2"]) == {"full_head", "64"} and set(results["verify_ms"]) >= {1, 5}


def test_eval_samples_continue_an_instructions_prompt_not_its_first_tokens():
    from sortedcli.commands.eval import sample_prompt

    # a chat example: the question (and the opened assistant turn) is the prompt, the answer is sampled
    assert sample_prompt({"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, 4, 5]}) == [1, 2, 3]
    # plain text (every token counts, or no labels): its first 8 tokens
    assert sample_prompt({"input_ids": list(range(20)), "labels": list(range(20))}) == list(range(8))
    assert sample_prompt({"input_ids": list(range(20))}) == list(range(8))
