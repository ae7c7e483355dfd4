"""Early exit that is cheap to check and meets a stated quality: exits never checked when their
threshold is above 1, confidence read over a frequent-token vocabulary (the full head only where a
token leaves), the multiply-adds each part costs, thresholds chosen from held-out data to keep the
perplexity within (1 + x) of the full model's, and ``generate --early-exit --max-ppl-increase X``.
Tiny random LLaMA models in float64 (see tests/test_decoding.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_decoding import VOCAB, decoding_benchmark_on_a_tiny_folder, hf_greedy, prompts, tiny_llama

from sortedcli import decoding as D
from sortedcli.models.decoder import DecoderStack


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def peaked(scale=15.0, seed=0):
    """Confident exits on a calmed model: tokens leave at several exits, mid-sequence."""
    model = tiny_llama(calm_depth=0.3, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def model():
    return peaked()


def frequent(stack, n=20):
    """The n most frequent ids of the model's own greedy text (a 'training set' for the tests)."""
    text = [D.generate(stack, p, max_new_tokens=20).tokens for p in prompts(6, seed=21)]
    return D.frequent_tokens(text, n, VOCAB)


def reference(model, prompt, exits, n, vocab=None):
    """Early exit without a KV cache, Stack.fill or the cheap readouts: every layer's input at every
    position is kept and each layer runs on the whole sequence of its inputs; every listed exit
    computes the full head, and its confidence is the softmax's top probability over all tokens, or
    (``vocab``) over the logits at those ids. A token leaves at the first exit whose confidence is
    >= its threshold; the layers it skipped take its exit state as their input (CALM). The prompt's
    last position picks its exit by the rule too. Returns (new tokens, exit of each after the first)."""
    L = len(model.model.layers)
    thresholds = {**{int(e): float(t) for e, t in exits.items()}, L: float("-inf")}
    inputs = [[] for _ in range(L)]
    ids, tokens, taken, P = list(map(int, prompt)), [], [], len(prompt)
    with torch.no_grad():
        t = 0
        while t < len(ids):
            h, chosen = model.model.embed_tokens(torch.tensor([[ids[t]]])), None
            for i in range(L):
                inputs[i].append(h)
                if chosen is not None and t >= P:
                    continue
                x = torch.cat(inputs[i], dim=1)
                pos = torch.arange(x.shape[1]).view(1, -1)
                h = model.model.layers[i](x, attention_mask=None, position_ids=pos,
                                          position_embeddings=model.model.rotary_emb(x, pos))[:, -1:]
                if chosen is None and i + 1 in thresholds:
                    logits = model.lm_head(model.model.norm(h))[0, -1]
                    read = logits if vocab is None else logits[vocab]
                    if torch.softmax(read, -1).max() >= thresholds[i + 1]:
                        chosen = (logits, i + 1)
            if t >= P - 1 and len(tokens) < n:
                tokens.append(int(chosen[0].argmax()))
                if t >= P:
                    taken.append(chosen[1])
                ids.append(tokens[-1])
            t += 1
    return tokens, taken


def counts(layers):
    out = {}
    for e in layers:
        out[e] = out.get(e, 0) + 1
    return out


# --- the rule, and what the cheap checks change -----------------------------------------------------

def test_thresholds_above_one_are_greedy_and_never_checked(model):
    stack = DecoderStack(model)
    vocab = frequent(stack)
    for prompt in prompts(3):
        for v in (None, vocab):
            got = D.early_exit(stack, prompt, thresholds={2: 1.5, 4: 1.01}, max_new_tokens=12, vocab=v)
            assert got.tokens == hf_greedy(model, prompt, 12)
            assert got.exits == {6: 11} and got.checks == 0 and got.layer_passes == 66


def test_thresholds_minus_infinity_are_the_shallowest_exit_with_fill_and_read_nothing(model):
    stack = DecoderStack(model)
    vocab = frequent(stack)
    for prompt in prompts(3):
        want = D.generate(stack, prompt, exit=2, max_new_tokens=12).tokens
        for v in (None, vocab):
            got = D.early_exit(stack, prompt, thresholds={2: float("-inf"), 4: 0.5}, max_new_tokens=12, vocab=v)
            assert got.tokens == want and got.exits == {2: 11} and got.checks == 0


@pytest.mark.parametrize("use_vocab", [False, True])
def test_early_exit_is_what_the_rule_says_against_a_cache_free_full_head_reference(model, use_vocab):
    """Tokens and the exit each took equal a reference that computes every listed exit's full head:
    with the confidence vocabulary, the rule reads the top probability of the softmax over those
    tokens' logits, and the token is still the full head's argmax (it may lie outside them)."""
    stack = DecoderStack(model)
    vocab = frequent(stack) if use_vocab else None
    thresholds = {1: 0.9, 2: 0.5, 4: 0.35}
    mixed = outside = 0
    for prompt in prompts(4, seed=3):
        got = D.early_exit(stack, prompt, thresholds=thresholds, max_new_tokens=16, vocab=vocab)
        tokens, taken = reference(model, prompt, thresholds, 16, vocab)
        assert got.tokens == tokens
        assert got.exits == counts(taken)
        mixed += len(got.exits) > 1
        outside += vocab is not None and any(t not in vocab.tolist() for t in got.tokens)
        # a check per listed exit the token reached, up to the one it left at
        assert got.checks == sum(sum(1 for e in thresholds if e <= layer) for layer in taken)
    assert mixed >= 2
    if use_vocab:
        assert outside  # tokens outside the confidence vocabulary are still decoded


def test_the_cheap_checks_are_exact_where_they_claim_to_be(model):
    """Leaving out exits above 1 and reading nothing at thresholds <= 0 change no token; a confidence
    vocabulary holding every token (in any order) is the full-head rule. A proper subset is a
    different rule (documented), so it is not compared here."""
    stack = DecoderStack(model)
    everything = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    for prompt in prompts(4, seed=5):
        plain = D.early_exit(stack, prompt, thresholds={1: 0.9, 2: 0.5, 4: 0.35}, max_new_tokens=16)
        tokens, taken = reference(model, prompt, {1: 0.9, 2: 0.5, 3: 1.2, 4: 0.35, 5: 7.0}, 16)
        off = D.early_exit(stack, prompt, thresholds={1: 0.9, 2: 0.5, 3: 1.2, 4: 0.35, 5: 7.0}, max_new_tokens=16)
        full = D.early_exit(stack, prompt, thresholds={1: 0.9, 2: 0.5, 4: 0.35}, max_new_tokens=16, vocab=everything)
        assert plain.tokens == off.tokens == full.tokens == tokens
        assert plain.exits == off.exits == full.exits == counts(taken)
        assert off.checks == plain.checks  # exits 3 and 5 (thresholds > 1) were never read
        zero = D.early_exit(stack, prompt, thresholds={2: 0.0}, max_new_tokens=16)
        assert zero.tokens == reference(model, prompt, {2: 0.0}, 16)[0] and zero.checks == 0


def test_teacher_forced_nll_reads_confidence_as_decoding_does(model):
    stack = DecoderStack(model)
    vocab = frequent(stack)
    prompt = prompts(1, seed=7)[0]
    free = D.early_exit(stack, prompt, thresholds={2: 0.5, 4: 0.35}, max_new_tokens=16, vocab=vocab)
    ids = torch.cat([prompt, torch.tensor(free.tokens)])
    _, layers = D.early_exit_nll(stack, ids, thresholds={2: 0.5, 4: 0.35}, score_from=len(prompt), vocab=vocab)
    # teacher forcing on the text early exit wrote itself takes the same exits (the first comes from the prompt)
    assert counts(layers[1:]) == free.exits


# --- what the parts cost --------------------------------------------------------------------------

def test_exit_costs_count_multiply_adds_from_the_weights_shapes():
    from transformers import LlamaConfig, LlamaForCausalLM

    small = DecoderStack(tiny_llama())  # hidden 32, FFN 64, 4 heads of 8, 2 key/value heads, vocab 61
    c = D.exit_costs(small, 20)
    assert (c.layer, c.head, c.check, c.fill) == (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64, 61 * 32, 20 * 32, 32 * 16 * 2)
    # SmolLM2-135M's shapes (no weights: the meta device): its head is 8 layers, a check over 4096 tokens 2/3 of one
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        smol = LlamaForCausalLM(cfg)
    c = D.exit_costs(DecoderStack(smol), 4096)
    assert c.layer == 3_538_944 and c.head == 28_311_552 and c.check == 2_359_296 and c.fill == 221_184
    assert c.head / c.layer == 8 and c.check / c.layer == pytest.approx(2 / 3)
    assert c.full(30) == 30 * c.layer + c.head
    # a token leaving at 24 after checking 15 and 24: 24 layers, 2 checks, the head, 6 fills
    assert c.token(24, 2, 30) / c.full(30) == pytest.approx((24 + 4 / 3 + 8 + 6 / 16) / 38)


def test_the_search_leaves_an_exit_off_when_its_checks_cost_more_than_it_saves():
    """A profile (positions x exits): exit 1 is confident on every position and as good as the full
    model; exit 3 never confident enough to matter. With cheap checks exit 1 goes on; when a check
    costs more than the layers it saves, nothing does (the full model answers, unread)."""
    conf = torch.tensor([[0.9, 0.2]] * 10, dtype=torch.float64)
    nll = torch.tensor([[1.0, 1.0, 1.0]] * 10, dtype=torch.float64)
    cheap = D.ExitCosts(layer=1.0, head=0.0, check=0.1, fill=0.0)
    assert D.choose_thresholds(conf, nll, [1, 3], 4, 0.05, cheap) == {1: 0.9}
    dear = D.ExitCosts(layer=1.0, head=0.0, check=3.5, fill=0.0)  # saves 3 layers, costs 3.5
    assert D.choose_thresholds(conf, nll, [1, 3], 4, 0.05, dear) == {}
    # a worse exit is let out only as far as the perplexity allows: half the positions are bad at exit 1
    conf = torch.tensor([[0.9, 0.2]] * 5 + [[0.6, 0.2]] * 5, dtype=torch.float64)
    nll = torch.tensor([[1.0, 1.0, 1.0]] * 5 + [[3.0, 3.0, 1.0]] * 5, dtype=torch.float64)
    got = D.choose_thresholds(conf, nll, [1, 3], 4, 0.05, cheap)
    assert got == {1: 0.9}  # the lowest threshold that keeps the 0.6-confident, bad positions in


def test_tuned_thresholds_meet_the_bound_on_the_data_they_were_chosen_on(model):
    stack = DecoderStack(model)
    vocab = frequent(stack)
    sequences = []
    for p in prompts(4, seed=11):  # text the model writes (its own continuations) and random tails
        text = D.generate(stack, p, max_new_tokens=24).tokens
        sequences.append((p.tolist() + text, len(p)))
    g = torch.Generator().manual_seed(3)
    sequences.append((torch.randint(3, VOCAB, (30,), generator=g).tolist(), 5))
    for v, x in ((None, 0.05), (vocab, 0.05), (vocab, 0.3)):
        got = D.tune_thresholds(stack, sequences, [1, 2, 3, 4, 5], x, vocab=v)
        assert got["thresholds"], got  # something pays on this model: the test is not vacuous
        # measured independently: teacher-forced early exit against the stock model's own NLL
        early, full, used = [], [], []
        for ids, first in sequences:
            nll, layers = D.early_exit_nll(stack, ids, thresholds=got["thresholds"], score_from=first, vocab=v)
            early += nll
            used += layers
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
            full += (-logp.gather(1, torch.tensor(ids[1:]).view(-1, 1))[first - 1:, 0]).tolist()
        increase = math.exp(sum(early) / len(early) - sum(full) / len(full)) - 1
        assert increase <= x + 1e-9, (increase, got)
        assert got["ppl_increase"] == pytest.approx(increase, abs=1e-6)
        assert got["layer_passes"] == pytest.approx(sum(used) / len(used) / 6) and got["layer_passes"] < 1
        assert 0 < got["cost"] < 1 and got["tokens"] == len(full) and sum(got["exits"].values()) == len(full)
        assert 0 < got["bound_cost"] < 1 and 0 < got["bound_cost_label_free"] <= 1  # (see the brute-force test)


def test_the_profiles_kl_is_each_exits_divergence_from_the_full_model_from_transformers_hidden_states(model):
    """exit_profile(kl=True) against transformers' own forward: exit k's logits are the LM head on the
    final norm of hidden_states[k]; KL(full || exit) per scored position, 0 for the full model."""
    stack = DecoderStack(model)
    ids = prompts(1, seed=13)[0].tolist() + [5, 9, 11, 4, 7]
    first = 3
    _, nll, kl = D.exit_profile(stack, [(ids, first)], [2, 4], kl=True)
    assert kl.shape == nll.shape == (len(ids) - first, 3)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    full = torch.log_softmax(out.logits[0, first - 1:-1].double(), -1)
    for j, k in enumerate([2, 4]):
        exit_ = torch.log_softmax(model.lm_head(model.model.norm(out.hidden_states[k]))[0, first - 1:-1].double(), -1)
        want = (full.exp() * (full - exit_)).sum(-1)
        assert torch.allclose(kl[:, j], want, atol=1e-4), (kl[:, j], want)
    assert (kl[:, -1] == 0).all() and (kl[:, :-1] > 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_the_oracle_floor_is_the_exact_minimum_within_one_positions_cost(seed):
    """oracle_cost against every choice of exit for 7 positions (3^7), brute force: never above the
    cheapest choice that keeps the perplexity, and below it by at most one position's cost range (the
    dual of a sum over positions with one constraint leaves at most one position split)."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    N, exits, L, x = 7, [1, 2], 4, 0.1
    full = torch.rand(N, generator=g, dtype=torch.float64) * 3
    worse = [full + (torch.rand(N, generator=g, dtype=torch.float64) - 0.2) * spread for spread in (1.0, 0.3)]
    nll = torch.stack([*worse, full], 1)  # the deeper exit nearer the full model; either sometimes below it
    costs = D.ExitCosts(layer=1.0, head=0.5, check=0.1, fill=0.2)
    per = [costs.token(layer, 0, L) for layer in (*exits, L)]
    budget = float(nll[:, -1].sum()) + math.log1p(x) * N
    best = min(sum(per[j] for j in pick) for pick in itertools.product(range(3), repeat=N)
               if sum(float(nll[i, j]) for i, j in enumerate(pick)) <= budget + 1e-12)
    exact = best / (N * costs.full(L))
    got = D.oracle_cost(nll, exits, L, x, costs)
    assert exact > per[0] / costs.full(L) + 1e-6  # the allowance binds: not every position can take exit 1
    assert got <= exact + 1e-9
    assert exact - got <= (max(per) - min(per)) / (N * costs.full(L)) + 1e-9
    # a perplexity allowance nothing reaches: every position takes the cheapest exit
    assert D.oracle_cost(nll, exits, L, 1e6, costs) == pytest.approx(per[0] / costs.full(L))
    assert D.oracle_cost(nll, [], L, x, costs) == 1.0


def test_tuning_falls_back_to_the_full_model_when_no_exit_can_be_good_enough():
    model = tiny_llama(seed=3)  # random, uncalmed: shallow exits are far from the full model
    stack = DecoderStack(model)
    g = torch.Generator().manual_seed(1)
    sequences = [(torch.randint(3, VOCAB, (24,), generator=g).tolist(), 4) for _ in range(2)]
    got = D.tune_thresholds(stack, sequences, [1, 2], 1e-6)
    assert got["thresholds"] == {} and got["ppl_increase"] == 0 and got["layer_passes"] == 1


# --- the command line ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["--early-exit", "--max-ppl-increase", "0"], "(0, 1]"),
    (["--early-exit", "--max-ppl-increase", "1.5"], "(0, 1]"),
    (["--early-exit", "--max-ppl-increase", "-0.1"], "(0, 1]"),
    (["--early-exit", "--max-ppl-increase", "abc"], "(0, 1]"),
    (["--max-ppl-increase", "0.05"], "add --early-exit"),
    (["--early-exit", "--max-ppl-increase", "0.05", "thresholds={2: 0.9}"], "not both"),
])
def test_bad_max_ppl_increase_is_one_line_and_writes_nothing(tmp_path, args, says):
    from conftest import cli

    p = cli(["generate", *args, "hello"], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
    assert not any(tmp_path.iterdir())


def test_max_ppl_increase_on_a_model_with_no_trained_exits_is_one_line(tmp_path):
    from conftest import cli

    _, folder = decoding_benchmark_on_a_tiny_folder(tmp_path)  # a pretrained folder: no run, no trained exits
    before = sorted(p.name for p in tmp_path.rglob("*"))
    p = cli(["generate", "--ckpt", folder, "--early-exit", "--max-ppl-increase", "0.05", "hello"], cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is not a run" in p.stderr, p.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_generate_chooses_thresholds_caches_them_and_reuses_them(tmp_path):
    from conftest import cli, explain, run_folders
    from test_exits import CORPUS

    from sortedcli.data import lm

    lm.train_tokenizer(CORPUS, 300, tmp_path / "tok")
    (tmp_path / "text.txt").write_text("\n\n".join(CORPUS))
    train = ["train", "model=llama_tiny", f"model.tokenizer={tmp_path / 'tok'}", "data=corpus",
             f"data.path={tmp_path / 'text.txt'}", "data.block_size=32", "data.doc_chars=120",
             "data.test_fraction=0.3", "dims=[depth]", "sampler=all", "optim=adamw", "trainer.batch_size=4",
             "trainer.max_steps=2"]
    p = cli([*train, "dims.depth.levels=[1,3,4]"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "runs")[0]
    g = cli(["generate", "--early-exit", "--max-ppl-increase", "0.05", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert g.returncode == 0, explain(g)
    doc = json.loads((run / "eval" / "early-exit.json").read_text())
    chosen = doc["chosen"]["0.05"]
    assert doc["last"] == "0.05" and chosen["ppl_increase"] <= 0.05 and set(chosen["thresholds"]) <= {"1", "3"}
    assert chosen["candidates"] == [1, 3] and chosen["vocab"] is None  # 300 tokens: no confidence vocabulary
    said = " ".join(g.stderr.split())  # rich wraps long lines
    n = int(said.split(" tokens in ")[0].split()[-1])  # the first token comes from the prompt's own pass
    assert f"exits of the {n - 1} tokens after the first" in said, said
    assert "chosen now" in said and f"(+{100 * chosen['ppl_increase']:.1f}%)" in said
    assert f"{chosen['layer_passes']:.2f} of the layer passes" in said
    again = cli(["generate", "--early-exit", "--max-tokens", "6", "The cat"], cwd=tmp_path)  # no flags: reused
    assert again.returncode == 0 and "cached in" in again.stderr and again.stdout == g.stdout, explain(again)
    doc["chosen"]["0.05"]["split"] = "test"  # a choice an earlier version made on whole items: chosen again
    (run / "eval" / "early-exit.json").write_text(json.dumps(doc))
    anew = cli(["generate", "--early-exit", "--max-ppl-increase", "0.05", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert anew.returncode == 0 and "chosen now" in " ".join(anew.stderr.split()), explain(anew)
    bad = cli(["generate", "--early-exit", "thresholds={2: 0.9}", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "never trained" in bad.stderr, explain(bad)
    top = cli(["generate", "--top-p", "0.5", "--max-tokens", "3", "The cat"], cwd=tmp_path)
    assert top.returncode == 0 and "no effect on greedy decoding" in top.stderr, explain(top)
    bad = cli(["generate", "--raw", "template=alpaca", "The cat"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "choose one" in bad.stderr, explain(bad)
    bad = cli(["generate", "template=chat", "--max-tokens", "6", "The cat"], cwd=tmp_path)  # a tokenizer without one
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no chat template" in bad.stderr, explain(bad)
    bad = cli(["generate", "--speculative", "--draft-exit", "2", "--max-tokens", "6", "The cat"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "never trained" in bad.stderr, explain(bad)
    assert "it trained 1, 3 (of 4 layers)" in bad.stderr
    raw = cli(["generate", "--exit", "2", "--max-tokens", "3", "The cat"], cwd=tmp_path)  # allowed, with a warning
    assert raw.returncode == 0 and "never trained it" in raw.stderr, explain(raw)
    # sampler=full trains the full model alone: its depth levels are not trained exits
    p = cli([*train, "dims.depth.levels=[1,3,4]", "sampler=full", "paths.runs=full"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    full = run_folders(tmp_path / "full")[0]
    for flags in (["--speculative"], ["--early-exit"], ["--early-exit", "--max-ppl-increase", "0.05"]):
        bad = cli(["generate", "--ckpt", full, *flags, "--max-tokens", "3", "The cat"], cwd=tmp_path)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "sampler=full" in bad.stderr, explain(bad)
    # a run that trained no exit below the full model: one line, nothing written
    p = cli([*train, "dims.depth.levels=[4]", "paths.runs=flat"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    flat = run_folders(tmp_path / "flat")[0]
    before = sorted(q.name for q in flat.rglob("*"))
    bad = cli(["generate", "--ckpt", flat, "--early-exit", "--max-ppl-increase", "0.05", "The cat"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "trained no exit" in bad.stderr, explain(bad)
    assert sorted(q.name for q in flat.rglob("*")) == before


def test_decoding_benchmark_has_a_row_with_thresholds_chosen_for_the_perplexity_bound(tmp_path):
    bench, folder = decoding_benchmark_on_a_tiny_folder(tmp_path)
    results = bench.main(["--model", str(folder), "--prompts", "2", "--new-tokens", "8", "--reps", "1", "--no-ppl",
                          "--ppl-items", "3", "--draft-exits", "2", "--draft-vocab", "0", "--threads", "1",
                          "--max-ppl-increase", "0.1", "--out", str(tmp_path / "r.json")])
    row = results["methods"]["early exit, chosen for ppl +10% (ours)"]
    assert row["ppl_early_exit"] <= 1.1 * row["ppl_full"] + 1e-9 and row["max_ppl_increase"] == 0.1
    assert 0 < row["teacher_forced_layers_used"] <= 1 and 0 < row["layers_used"] <= 1 and row["ppl_tokens"] > 0
