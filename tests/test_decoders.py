"""Every supported decoder class through one adapter (timm's habit: tests parametrized over what is
supported). For each class, a tiny random config built offline, in float64: the sorted model equals the
stock model; exit k equals the stock model built with k layers; heads/ffn sub-models equal their
extracted plain models, whose export the stock ``AutoModelForCausalLM`` reloads; importance sorting keeps
the full model's function; greedy and self-speculative decoding equal a no-cache greedy loop of the
stock model. Unsupported classes and dims are refused in one line. One CLI round trip on Qwen3."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli, explain, run_folders
from sortedcli import decoding as D
from sortedcli.errors import UsageError
from sortedcli.models import create, entry
from sortedcli.models.decoder import DecoderStack, importance_groups, layout, truncated
from sortedcli.nest import SubModel, extract, run_exits, use
from sortedcli.nest.importance import sort_by_importance

VOCAB = 97
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, vocab_size=VOCAB, head_dim=8, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
SLIDING = {"sliding_window": 4}
#: model_type -> what it adds to the tiny config (sliding windows shorter than the test prompts)
CLASSES = {
    "llama": {},
    "mistral": SLIDING,
    "qwen2": {**SLIDING, "use_sliding_window": True, "max_window_layers": 2},
    "qwen3": {"tie_word_embeddings": True},
    "gemma": {},
    "gemma2": {**SLIDING, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 10.0, "query_pre_attn_scalar": 8},
    "gemma3_text": {**SLIDING, "layer_types": ["sliding_attention", "full_attention"] * 2,
                    "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 8},
    "phi3": SLIDING,
    "olmo2": {},
}
#: the width dims each layout allows (fused projections and whole-projection q/k norms cannot nest)
DIMS = {"phi3": ["depth"], "olmo2": ["depth", "ffn"]}


def tiny(kind: str) -> dict:
    return {**BASE, **CLASSES[kind], "model_type": kind}


def stock_of(kind: str, state: dict, **changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in tiny(kind).items() if k != "model_type"}
    if "num_hidden_layers" in changes and "layer_types" in values:
        values["layer_types"] = values["layer_types"][:changes["num_hidden_layers"]]
    config = AutoConfig.for_model(kind, **{**values, **changes})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing, missing
    return model


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """The stock model's greedy continuation, one full forward per token (no cache to share bugs with)."""
    seq, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(seq).logits[0, -1].argmax())
            out.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    return out


@pytest.fixture(params=list(CLASSES))
def kind(request):
    return request.param


@pytest.fixture
def model(kind):
    torch.manual_seed(0)
    return create("causal_lm", config=tiny(kind), attn_implementation="eager").double().eval()


IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def test_the_sorted_model_is_the_stock_model_and_exit_k_is_the_stock_model_with_k_layers(kind, model):
    stock = stock_of(kind, model.state_dict())
    assert type(stock) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, stock(IDS).logits, rtol=0, atol=1e-10)
        exits = run_exits(model, {"input_ids": IDS}, [1, 2, 4])
        for k in (1, 2):
            cut = stock_of(kind, model.state_dict(), num_hidden_layers=k)
            torch.testing.assert_close(exits[k], cut(IDS).logits, rtol=0, atol=1e-10)
            torch.testing.assert_close(truncated(model, k)(IDS).logits, exits[k], rtol=0, atol=1e-10)


def test_width_sub_models_equal_their_extracted_plain_models_and_the_stock_class_reloads_the_export(
        kind, model, tmp_path):
    from transformers import AutoModelForCausalLM

    dims = DIMS.get(kind, ["depth", "heads", "ffn"])
    assert list(layout(model).dims) == dims
    levels = {"depth": 3, "heads": 0.5, "ffn": 0.5}
    sub = SubModel.of(**{d: levels[d] for d in dims})
    example = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    plain = extract(model, sub, example)  # checked equal to the scoped forward
    assert plain.config.num_hidden_layers == 3
    if "heads" in dims:
        assert (plain.config.num_attention_heads, plain.config.num_key_value_heads) == (2, 1)
    if "ffn" in dims:
        assert plain.config.intermediate_size == 32
    entry("causal_lm").save(tmp_path, plain.float(), {"submodel": dict(sub.levels)}, example)  # reload-checked
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    assert type(back) is type(model)
    with torch.no_grad(), use(model, sub):
        torch.testing.assert_close(back(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_importance_sorting_keeps_the_full_model_and_puts_the_strongest_units_first(kind, model):
    from sortedcli.nest.importance import scores

    with torch.no_grad():
        before = model(IDS).logits
    groups = importance_groups(model)
    assert len(groups) == 4 * (len(DIMS.get(kind, ["depth", "heads", "ffn"])) - 1)
    sort_by_importance(groups, "l1")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-10)
    for g in groups:
        s = scores(g, "l1")
        assert torch.all(s[:-1] >= s[1:])


def test_greedy_speculative_and_early_exit_decoding_equal_the_stock_models_greedy_loop(kind, model):
    stock = stock_of(kind, model.state_dict())
    stack = DecoderStack(model)
    prompt = IDS[0, :6].tolist()  # longer than the sliding windows: their masks are exercised
    want = greedy(stock, prompt, 10)
    assert D.generate(stack, prompt, max_new_tokens=10).tokens == want
    for k in (1, 3):
        assert D.speculative(stack, prompt, draft_exit=2, k=k, max_new_tokens=10).tokens == want
    # thresholds no exit can meet: every token runs to the end, through the skipped-layer fill path
    assert D.early_exit(stack, prompt, thresholds={1: 2.0, 2: 2.0}, max_new_tokens=10).tokens == want
    assert greedy(truncated(stock, 2), prompt, 6) == D.generate(stack, prompt, exit=2, max_new_tokens=6).tokens


def test_fill_writes_the_keys_and_values_a_skipped_layer_would_have_cached(kind, model):
    """CALM's propagation: the skipped layers' cache entries equal what those layers compute from the
    exiting hidden state (fused projections, per-head or whole key norms and per-type rotary included)."""
    stack = DecoderStack(model)
    ids, pos = IDS[:1, :5], torch.arange(5)
    with torch.no_grad():
        h = stack.layers(stack.embed(ids), 0, 2, filled := stack.new_cache(), pos)
        stack.fill(h, 2, 4, filled, pos)
        for i in (2, 3):  # layer i run on the state that exited at 2 caches what fill wrote for it
            ran = stack.new_cache()
            stack.layers(h, i, i + 1, ran, pos)
            torch.testing.assert_close(filled.layers[i].keys, ran.layers[i].keys, rtol=0, atol=1e-10)
            torch.testing.assert_close(filled.layers[i].values, ran.layers[i].values, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind,what", [("gpt2", "Conv1D"), ("qwen2_moe", "mixture of experts"),
                                       ("mixtral", "mixture of experts")])
def test_a_decoder_outside_the_layout_is_refused_in_one_line_naming_the_class(kind, what):
    small = {"gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB),
             "qwen2_moe": dict(BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                               shared_expert_intermediate_size=16),
             "mixtral": dict(BASE, num_local_experts=4, num_experts_per_tok=2)}[kind]
    with pytest.raises(UsageError) as e:
        create("causal_lm", config={**small, "model_type": kind})
    msg = str(e.value)
    assert "\n" not in msg and what in msg and " is not supported: " in msg and "supported: LLaMA-layout" in msg


def test_llama_entry_keeps_refusing_other_classes_and_points_at_causal_lm():
    with pytest.raises(UsageError, match="model=causal_lm"):
        create("llama", config={**tiny("qwen3")})


def test_a_dim_the_layout_cannot_nest_is_refused_by_the_grid_with_the_reason():
    from omegaconf import OmegaConf

    from sortedcli.build import build_grid

    model = create("causal_lm", config=tiny("phi3"))
    cfg = OmegaConf.create({"model": {"name": "causal_lm"}, "dims": {"heads": {"levels": [0.5, 1.0]}}})
    with pytest.raises(UsageError, match=r"Phi3ForCausalLM: its q/k/v projections are fused.*supports depth"):
        build_grid(cfg, model)


def test_cli_round_trip_on_qwen3_train_eval_export_generate(tmp_path):
    """A Qwen3 (q/k norms per head, tied embeddings) through the CLI: train depth+heads+ffn, eval every
    sub-model, export (reloaded in the stock class), generate greedy = self-speculative."""
    from sortedcli.data import lm

    corpus = ["The cat sat on the mat. The dog sat on the log. " * 4, "Two plus three is five. " * 8] * 4
    lm.train_tokenizer(corpus, 300, tmp_path / "tok")
    qa = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
          for a in range(6) for b in range(3)]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    config = ("{model_type: qwen3, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 4, "
              "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 8, max_position_embeddings: 256, "
              "tie_word_embeddings: true}")
    args = ["model=causal_lm", f"model.config={config}", f"model.tokenizer={tmp_path / 'tok'}", "data=alpaca",
            f"data.path={tmp_path / 'qa.json'}", "data.test_fraction=0.2", "dims=[depth,heads,ffn]",
            "dims.depth.levels=[2,4]", "dims.heads.levels=[0.5,1.0]", "dims.ffn.levels=[0.5,1.0]", "sampler=all",
            "optim=adamw", "trainer.batch_size=4", "trainer.max_steps=2", "eval.batch_size=8"]
    p = cli(["train", *args], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "runs")[0]
    p = cli(["eval", "--all-submodels"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    rows = json.loads((run / "eval" / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert len(rows) == 8 and all(r["perplexity"] > 1 for r in rows)
    p = cli(["export", "--budget", "0.7"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    exported = json.loads((run / "export" / "budget-0.7" / "config.json").read_text())
    assert exported["model_type"] == "qwen3" and exported["architectures"] == ["Qwen3ForCausalLM"]
    texts = []
    for flags in ([], ["--speculative", "--draft-exit", "2"]):
        g = cli(["generate", *flags, "--max-tokens", "8", "What is 2 plus 2?"], cwd=tmp_path)
        assert g.returncode == 0, explain(g)
        texts.append(g.stdout)
    assert texts[0] == texts[1]
    bad = cli(["train", *[a for a in args if not a.startswith("model.config")],
               "model.config={model_type: gpt2, n_embd: 32, n_layer: 2, n_head: 4}"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "GPT2LMHeadModel" in bad.stderr
