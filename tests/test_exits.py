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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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

from test_decoding import VOCAB, prompts, tiny_llama  # noqa: E402

from sortedcli import decoding as D  # noqa: E402
from sortedcli.models.llama import LlamaStack  # noqa: E402


@pytest.fixture(scope="module")
def calm():
    return tiny_llama(calm_depth=0.3)


def test_frequent_tokens_ranks_by_count_then_id():
    got = D.frequent_tokens([[5, 5, 3, 7], torch.tensor([3, 5, 9, 9, 9])], 4, vocab_size=12)
    assert got.tolist() == [5, 9, 3, 7]  # 5 three times, 9 three times (5 < 9), then 3, then 7
    assert D.frequent_tokens([[1]], 4, vocab_size=3).tolist() == [1, 0, 2]  # unseen ids fill in id order


def test_a_subset_heads_logits_are_the_full_heads_logits_at_those_ids(calm):
    stack = LlamaStack(calm)
    vocab = torch.tensor([7, 3, 40, 12, 59])
    h = torch.randn(1, 3, 32, dtype=torch.float64)
    assert torch.allclose(stack.vocab_head(vocab)(h), stack.head(h)[..., vocab], rtol=0, atol=1e-12)


@pytest.mark.parametrize("check_first", [0.0, 1.0])
def test_greedy_speculative_with_a_draft_vocabulary_is_plain_greedy(calm, check_first):
    stack = LlamaStack(calm)
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
    stack = LlamaStack(model)
    L, E = stack.num_layers, 2
    for prompt in prompts(4, seed=9):
        greedy = D.generate(stack, prompt, max_new_tokens=24)
        split = D.speculative(stack, prompt, draft_exit=E, max_new_tokens=24, k=4, check_first=1.0)
        joint = D.speculative(stack, prompt, draft_exit=E, max_new_tokens=24, k=4, check_first=0.0)
        assert split.tokens == joint.tokens == greedy.tokens
        assert split.acceptance < 0.5
        assert split.layer_passes <= greedy.layer_passes + split.drafted * E
        assert joint.layer_passes > greedy.layer_passes + joint.drafted * E
