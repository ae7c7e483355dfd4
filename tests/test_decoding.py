"""Generation from an exit, self-speculative decoding and early exit, against transformers' own
generate on tiny random LLaMA models (float64, so that batched and one-at-a-time passes cannot
flip an argmax by rounding)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sortedcli import decoding as D
from sortedcli.models.llama import LlamaStack, truncated

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not fight the other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(layers=6, seed=0, calm_depth=0.0, vocab=VOCAB):
    """A random LlamaForCausalLM (GQA: 4 query heads, 2 key/value heads). ``calm_depth`` > 0 scales
    the output projections of layers after the second down, so shallow exits often agree with the
    full model (speculative drafts get accepted) but not always."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).double().eval()
    if calm_depth:
        with torch.no_grad():
            for layer in model.model.layers[2:]:
                layer.self_attn.o_proj.weight.mul_(calm_depth)
                layer.mlp.down_proj.weight.mul_(calm_depth)
    return model


def hf_greedy(model, prompt, n, **kw):
    out = model.generate(prompt.view(1, -1), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         eos_token_id=None, pad_token_id=0, **kw)
    return out[0, prompt.numel():].tolist()


def prompts(count, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(1, 12, (), generator=g)),), generator=g) for _ in range(count)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(calm_depth=0.3)


def test_stack_all_layers_and_head_is_the_model(model):
    stack = LlamaStack(model)
    ids = prompts(1)[0].view(1, -1)
    hidden = stack.layers(stack.embed(ids), 0, stack.num_layers, stack.new_cache(), torch.arange(ids.shape[1]))
    torch.testing.assert_close(stack.head(hidden), model(ids).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("exit", [1, 3, 6])
def test_generation_from_an_exit_equals_hf_generate_of_the_truncated_model(model, exit):
    stack = LlamaStack(model)
    small = truncated(model, exit)
    for prompt in prompts(4):
        assert D.generate(stack, prompt, exit=exit, max_new_tokens=12).tokens == hf_greedy(small, prompt, 12)


def test_self_speculative_greedy_equals_plain_greedy_over_many_prompts_and_draft_exits(model):
    stack = LlamaStack(model)
    accepted = rejected = 0
    for i, prompt in enumerate(prompts(12)):
        reference = hf_greedy(model, prompt, 24)
        for draft_exit in (1, 2, 3, 5):
            got = D.speculative(stack, prompt, draft_exit=draft_exit, max_new_tokens=24, k=1 + i % 4)
            assert got.tokens == reference, (i, draft_exit)
            accepted += got.accepted
            rejected += got.drafted - got.accepted
    # both paths were exercised: drafts kept (cache shared) and drafts thrown away (cache cropped)
    assert accepted > 50 and rejected > 50, (accepted, rejected)


def test_speculative_adapts_the_draft_length():
    agree = tiny_llama(calm_depth=0.01)  # deep layers nearly silent: the draft is almost always right
    stack = LlamaStack(agree)
    prompt = prompts(1)[0]
    fixed = D.speculative(stack, prompt, draft_exit=2, max_new_tokens=40, k=2, adaptive=False)
    grown = D.speculative(stack, prompt, draft_exit=2, max_new_tokens=40, k=2, adaptive=True)
    assert fixed.tokens == grown.tokens == hf_greedy(agree, prompt, 40)
    assert grown.acceptance > 0.9 and grown.rounds < fixed.rounds


def test_speculative_is_also_transformers_assistant_early_exit_output(model):
    stack = LlamaStack(model)
    for prompt in prompts(3):
        ours = D.speculative(stack, prompt, draft_exit=2, max_new_tokens=16).tokens
        assert ours == hf_greedy(model, prompt, 16, assistant_early_exit=2)


def test_early_exit_thresholds_zero_is_the_smallest_exit_and_above_one_is_the_full_model(model):
    stack = LlamaStack(model)
    for prompt in prompts(4):
        lowest = D.early_exit(stack, prompt, thresholds={2: 0.0, 4: 0.0}, max_new_tokens=12)
        assert lowest.tokens == D.generate(stack, prompt, exit=2, max_new_tokens=12).tokens
        assert lowest.exits == {2: 11}
        full = D.early_exit(stack, prompt, thresholds={2: 1.01, 4: 1.01}, max_new_tokens=12)
        assert full.tokens == hf_greedy(model, prompt, 12) and full.exits == {6: 11}


def test_early_exit_fills_the_skipped_layers_kv_from_the_exit_state(model):
    stack = LlamaStack(model)
    prompt = prompts(1)[0]
    cache = stack.new_cache()
    n = prompt.numel()
    stack.layers(stack.embed(prompt.view(1, -1)), 0, 6, cache, torch.arange(n))
    hidden = stack.layers(stack.embed(torch.tensor([[5]])), 0, 2, cache, torch.tensor([n]))
    stack.fill(hidden, 2, 6, cache, torch.tensor([n]))
    assert [stack.cached(cache, i) for i in range(6)] == [n + 1] * 6
    # the filled key of layer 3 is that layer's own k_proj of its input norm of the exit state, rotated
    layer = model.model.layers[3]
    ref = stack.new_cache()
    k = layer.self_attn.k_proj(layer.input_layernorm(hidden))
    cos, sin = model.model.rotary_emb(hidden, torch.tensor([[n]]))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    k = k.view(1, 1, -1, layer.self_attn.head_dim).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(cache.layers[3].keys[:, :, -1:], k)
    del ref
    # a mid threshold mixes exits, and the sequence still decodes (every layer's cache stays aligned)
    mixed = D.early_exit(stack, prompt, thresholds=D.scaled_thresholds(6), max_new_tokens=30)
    assert len(mixed.tokens) == 30 and sum(mixed.exits.values()) == 29


def test_scaled_thresholds_map_the_papers_exits_onto_fewer_layers():
    assert D.scaled_thresholds(40) == D.PAPER_THRESHOLDS
    assert D.scaled_thresholds(10) == {3: 0.95, 4: 0.95, 5: 0.9, 6: 0.9, 7: 0.8, 8: 0.8, 9: 0.7}


def test_eos_stops_and_tokens_stream_in_order(model):
    stack = LlamaStack(model)
    prompt = prompts(1)[0]
    free = D.generate(stack, prompt, max_new_tokens=20).tokens
    eos = free[5]
    stop = free.index(eos) + 1
    for run in (lambda **kw: D.generate(stack, prompt, **kw),
                lambda **kw: D.speculative(stack, prompt, draft_exit=2, **kw),
                lambda **kw: D.early_exit(stack, prompt, thresholds={3: 1.01}, **kw)):
        streamed = []
        got = run(max_new_tokens=20, eos=eos, on_token=streamed.append)
        assert got.tokens == streamed == free[:stop] and got.stopped_at_eos


def test_top_p_keeps_the_smallest_set_reaching_p():
    s = D.Sampling(temperature=1.0, top_p=0.7)
    p = s.probs(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])))
    torch.testing.assert_close(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    with pytest.raises(ValueError):
        D.Sampling(top_p=0)


def test_sampling_is_seeded_and_speculative_sampling_keeps_the_full_models_distribution():
    vocab, temperature, runs = 8, 1.0, 500
    model = tiny_llama(layers=4, vocab=vocab, calm_depth=0.5)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions that differ between exits
    stack = LlamaStack(model)
    prompt = torch.tensor([5, 3, 6])

    def seeded(seed):
        return D.Sampling(temperature=temperature, generator=torch.Generator().manual_seed(seed))

    assert D.generate(stack, prompt, max_new_tokens=8, sampling=seeded(3)).tokens == \
        D.generate(stack, prompt, max_new_tokens=8, sampling=seeded(3)).tokens
    # Exact distribution of the second new token (summed over the first, which the full model draws):
    # from the full model (p2), and from the 1-layer draft alone (q2).
    with torch.no_grad():
        p1 = torch.softmax(model(prompt.view(1, -1)).logits[0, -1] / temperature, -1)
        seqs = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab).view(-1, 1)], 1)
        out = model(seqs, output_hidden_states=True)
        p2 = (p1.view(-1, 1) * torch.softmax(out.logits[:, -1] / temperature, -1)).sum(0)
        q2 = (p1.view(-1, 1) * torch.softmax(stack.head(out.hidden_states[1])[:, -1] / temperature, -1)).sum(0)
    counts = torch.zeros(vocab)
    for seed in range(runs):
        tokens = D.speculative(stack, prompt, draft_exit=1, max_new_tokens=3, k=2, sampling=seeded(seed)).tokens
        counts[tokens[1]] += 1
    tv = 0.5 * (counts / runs - p2).abs().sum()
    assert tv < 0.08, tv  # total variation from the full model's distribution: sampling noise only
    assert 0.5 * (q2 - p2).abs().sum() > 0.3  # keeping every draft would be visibly off


def test_teacher_forced_early_exit_nll_matches_the_model_and_the_exit_it_takes(model):
    stack = LlamaStack(model)
    ids = prompts(1, seed=5)[0]
    ids = torch.cat([ids, torch.randint(3, VOCAB, (10,), generator=torch.Generator().manual_seed(2))])
    with torch.no_grad():
        full = -torch.log_softmax(model(ids[None]).logits[0, :-1], -1).gather(1, ids[1:, None])[:, 0]
        low = -torch.log_softmax(truncated(model, 2)(ids[None]).logits[0, :-1], -1).gather(1, ids[1:, None])[:, 0]
    nll, layers = D.early_exit_nll(stack, ids, thresholds={}, score_from=4)
    torch.testing.assert_close(torch.tensor(nll, dtype=torch.float64), full[3:])
    assert layers == [6] * len(nll)
    nll, layers = D.early_exit_nll(stack, ids, thresholds={2: 0.0, 4: 0.0}, score_from=4)
    torch.testing.assert_close(torch.tensor(nll, dtype=torch.float64), low[3:])
    assert layers == [2] * len(nll)


@pytest.mark.slow
def test_decoding_benchmark_runs_on_a_model_folder_and_checks_identical_outputs(tmp_path):
    import importlib.util
    from pathlib import Path

    from sortedcli.data import lm

    folder = tmp_path / "model"
    tok = lm.train_tokenizer(lm.read_text(lm.package_file("hamlet"))[:20], 300, folder)
    model = tiny_llama(layers=4, vocab=len(tok), calm_depth=0.3).float()
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.save_pretrained(folder)
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decoding.py"
    spec = importlib.util.spec_from_file_location("bench_decoding", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    results = bench.main(["--model", str(folder), "--prompts", "2", "--new-tokens", "8", "--reps", "1",
                          "--ppl-items", "2", "--draft-exits", "1,2", "--threads", "1", "--out", str(out)])
    assert out.is_file() and results["prompt_source"].startswith("held-out GSM8K")
    methods = results["methods"]
    for name in ("greedy (transformers)", "speculative, draft exit 1 (ours)", "assistant_early_exit=2 (transformers)"):
        assert methods[name]["identical"] == 2, name
    spec2 = methods["speculative, draft exit 2 (ours)"]
    assert 0 <= spec2["a"] <= 1 and 0 < spec2["c"] and spec2["tokens_per_round"] >= 1
    ee = methods["early exit (ours)"]
    assert ee["ppl_tokens"] > 0 and ee["ppl_full"] > 1 and 0 < ee["layers_used"] <= 1
