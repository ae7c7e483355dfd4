"""Every supported Hugging Face encoder layout (sortedcli/models/bert.py), each from a tiny random config
built offline, in float64 against the stock transformers class: the sorted full model, every exit, the
heads/ffn sub-models against their extracted plain models, importance sorting, and the export folder
reloaded by the stock AutoModelForSequenceClassification."""

from __future__ import annotations

import re

import pytest
import torch

from sortedcli.errors import UsageError
from sortedcli.models import bert
from sortedcli.nest import SubModel, check_equal, extract, run_exits, use
from sortedcli.nest.importance import scores, sort_by_importance

VOCAB, CLASSES = 40, 3
LAYERS = {"num_hidden_layers": 3}
BERTISH = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}
MODERN = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 48,
          "max_position_embeddings": 64, "global_attn_every_n_layers": 2, "local_attention": 4,
          "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "sep_token_id": 3, "cls_token_id": 2}

#: case -> (model_type, config fields, stock class name, layout, depth key, ffn key)
CASES = {
    "bert": ("bert", {**BERTISH, **LAYERS}, "BertForSequenceClassification", "bert",
             "num_hidden_layers", "intermediate_size"),
    "roberta": ("roberta", {**BERTISH, **LAYERS, "pad_token_id": 1}, "RobertaForSequenceClassification", "bert",
                "num_hidden_layers", "intermediate_size"),
    "xlm-roberta": ("xlm-roberta", {**BERTISH, **LAYERS, "pad_token_id": 1}, "XLMRobertaForSequenceClassification",
                    "bert", "num_hidden_layers", "intermediate_size"),
    "electra": ("electra", {**BERTISH, **LAYERS, "embedding_size": 16}, "ElectraForSequenceClassification", "bert",
                "num_hidden_layers", "intermediate_size"),
    "distilbert": ("distilbert", {"dim": 32, "n_layers": 3, "n_heads": 4, "hidden_dim": 64,
                                  "max_position_embeddings": 64}, "DistilBertForSequenceClassification",
                   "distilbert", "n_layers", "hidden_dim"),
    "modernbert": ("modernbert", MODERN, "ModernBertForSequenceClassification", "modernbert",
                   "num_hidden_layers", "intermediate_size"),
    "modernbert-mean": ("modernbert", {**MODERN, "classifier_pooling": "mean"}, "ModernBertForSequenceClassification",
                        "modernbert", "num_hidden_layers", "intermediate_size"),
}


def sorted_model(case):
    model_type, fields, *_ = CASES[case]
    torch.manual_seed(0)
    return bert.build_encoder(CLASSES, config={"model_type": model_type, "vocab_size": VOCAB, **fields}).double().eval()


def stock(case, state, **override):
    """The stock transformers class of ``case`` (``override``: config fields), loaded with ``state``;
    returns the model and the keys of ``state`` it did not take."""
    from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification

    model_type, fields, cls_name, *_ = CASES[case]
    cfg = CONFIG_MAPPING[model_type](**{**fields, **override}, vocab_size=VOCAB, num_labels=CLASSES)
    cfg._attn_implementation = "eager"
    model = AutoModelForSequenceClassification.from_config(cfg).double().eval()
    assert type(model).__name__ == cls_name
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing, missing
    return model, unexpected


def example(n=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, n):  # padded rows of different lengths
        mask[i, length - i:] = 0  # (fewer than ModernBERT's half window: no padded query sees no key)
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, x, sub=None):
    """``model``'s logits on ``x`` (a sorted model: as the sub-model ``sub``)."""
    with torch.no_grad():
        if not hasattr(model, "sortednet"):
            return model(**x).logits
        with use(model, sub):
            return model(**x).logits


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def depth_of(case):
    return CASES[case][1].get("num_hidden_layers", CASES[case][1].get("n_layers"))


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


def test_layout_is_found_from_the_modules_and_the_full_sorted_model_is_the_stock_model(case):
    model = sorted_model(case)
    assert type(model).__name__ == CASES[case][2] and bert.layout_of(model).name == CASES[case][3]
    assert bert.supported_dims(model) == ("depth", "heads", "ffn")
    plain, unexpected = stock(case, model.state_dict())
    assert not unexpected
    x = example()
    close(logits(model, x), logits(plain, x))


def test_every_exit_equals_the_stock_model_cut_to_k_layers(case):
    model = sorted_model(case)
    n, key = depth_of(case), CASES[case][4]
    x = example()
    with torch.no_grad(), use(model, SubModel.of(depth=n)):
        exits = run_exits(model, x, list(range(1, n + 1)))
    for k in range(1, n + 1):
        cut, unexpected = stock(case, model.state_dict(), **{key: k})
        dropped = {int(m.group(1)) for u in unexpected for m in [re.search(r"\.layers?\.(\d+)\.", u)] if m}
        assert dropped == set(range(k, n)) and all(re.search(r"\.layers?\.\d+\.", u) for u in unexpected)
        close(exits[k], logits(cut, x))
        close(logits(model, x, SubModel.of(depth=k)), exits[k])


def test_width_sub_models_equal_their_extracted_plain_models(case):
    model = sorted_model(case)
    x = example()
    lay = bert.layout_of(model)
    blocks = lay.blocks or {}
    with pytest.raises(UsageError, match=f"{CASES[case][2]} cannot sort dims width: it supports dims=\\[depth,heads,ffn\\]"):
        bert.check_dims(model, ["depth", "width"])
    bert.check_dims(model, bert.supported_dims(model))
    for sub in [SubModel.of(depth=2, heads=0.5, ffn=0.5), SubModel.of(depth=3, heads=0.25, ffn=1.0),
                SubModel.of(depth=1, heads=1.0, ffn=0.25)]:
        plain = extract(model, sub, x)
        assert check_equal(model, sub, plain, x, atol=1e-10, rtol=1e-9) < 1e-10
        assert not plain._forward_pre_hooks  # nothing of sortedcli left in the plain model
        layer, full = bert._stack(plain, lay)[0], bert._stack(model, lay)[0]
        for dim, units_of in (("heads", lay.heads), ("ffn", lay.ffn)):  # the producers really got smaller
            n = blocks.get(dim, 1)
            got, whole = units_of(layer)[0][0].out_features, units_of(full)[0][0].out_features
            assert got == n * int(whole // n * sub[dim]), (dim, got, whole)


def test_importance_sorting_keeps_the_full_model_and_puts_the_strongest_units_first(case):
    model = sorted_model(case)
    x = example()
    before = logits(model, x)
    groups = bert.importance_groups(model)
    assert len(groups) == 2 * depth_of(case)
    orders = sort_by_importance(groups, "l1")
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders.values())  # something moved
    close(logits(model, x), before)
    for g in bert.importance_groups(model):
        s = scores(g, "l1")
        assert torch.all(s[:-1] >= s[1:]), g.name


def test_export_reloads_in_the_stock_auto_class_and_matches(case, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = sorted_model(case)
    _, _, cls_name, layout, depth_key, ffn_key = CASES[case]
    x = example()
    sub = SubModel.of(depth=2, heads=1.0, ffn=0.5)
    assert bert.exportable(model, sub) and not bert.exportable(model, SubModel.of(depth=2, heads=0.5, ffn=1.0))
    plain = extract(model, sub, x)
    bert.save(tmp_path, plain, {"name": sub.name}, x)
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path), attn_implementation="eager")
    reloaded = reloaded.double().eval()
    assert type(reloaded).__name__ == cls_name and getattr(reloaded.config, depth_key) == 2
    assert getattr(reloaded.config, ffn_key) == getattr(model.config, ffn_key) // 2
    if layout == "modernbert":
        assert reloaded.config.layer_types == model.config.layer_types[:2]
    close(logits(reloaded, x), logits(model, x, sub))


@pytest.mark.parametrize("model_type,fields,name", [
    ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "pad_token_id": 0}, "GPT2ForSequenceClassification"),
    ("deberta-v2", {**BERTISH, "num_hidden_layers": 2}, "DebertaV2ForSequenceClassification"),
    ("xlm-roberta-xl", {**BERTISH, "num_hidden_layers": 2}, "XLMRobertaXLForSequenceClassification"),
])
def test_an_encoder_of_another_layout_is_refused_in_one_line(model_type, fields, name):
    with pytest.raises(UsageError) as e:
        bert.build_encoder(CLASSES, config={"model_type": model_type, "vocab_size": VOCAB, **fields})
    msg = str(e.value)
    assert name in msg and "supported are" in msg and "\n" not in msg


def test_a_config_without_model_type_is_still_a_bert_and_an_unknown_type_is_refused():
    model = bert.build_encoder(2, config={**BERTISH, "num_hidden_layers": 2, "vocab_size": VOCAB})
    assert type(model).__name__ == "BertForSequenceClassification"
    with pytest.raises(UsageError, match="model_type=nonesuch"):
        bert.build_encoder(2, config={"model_type": "nonesuch"})


def plain_bert():
    from transformers import AutoModelForSequenceClassification, BertConfig

    cfg = BertConfig(**BERTISH, num_hidden_layers=2, vocab_size=VOCAB, num_labels=CLASSES)
    cfg._attn_implementation = "eager"
    return AutoModelForSequenceClassification.from_config(cfg)


def test_a_head_that_does_not_read_the_last_layer_as_its_layout_says_is_refused():
    model = plain_bert()
    model.classifier = torch.nn.Sequential(model.classifier)  # reads every position, not the pooler
    with pytest.raises(UsageError, match="BertForSequenceClassification has the bert layout's layers but its head"):
        bert.sortify_encoder(model)


def test_an_attention_that_cannot_take_fewer_heads_is_refused():
    model = plain_bert()

    def fixed_heads(m, args, out):  # as an attention that reshapes with its configured head count would
        if out.shape[-1] != 32:
            raise RuntimeError(f"shape '[2, 5, 4, 8]' is invalid for input of size {out.numel()}")

    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(fixed_heads)
    with pytest.raises(UsageError, match="does not run with fewer heads or FFN neurons"):
        bert.sortify_encoder(model)


def test_a_modernbert_width_sub_model_trains_only_its_prefix_of_each_fused_block():
    model = sorted_model("modernbert").train()
    layer = model.model.layers[1]
    with use(model, SubModel.of(heads=0.5, ffn=0.25)):
        model(**example()).logits.logsumexp(-1).sum().backward()
    qkv = layer.attn.Wqkv.weight.grad.view(3, 4, 8, 32)  # q | k | v, 4 heads of 8
    wi = layer.mlp.Wi.weight.grad.view(2, 48, 32)  # input | gate, 48 neurons
    assert qkv[:, :2].abs().sum((1, 2, 3)).gt(0).all() and not qkv[:, 2:].any()
    assert wi[:, :12].abs().sum((1, 2)).gt(0).all() and not wi[:, 12:].any()


def test_cli_trains_and_exports_a_tiny_modernbert_with_mean_pooling(tmp_path):
    """train (SoFT: every exit of each drawn width from one trunk pass, the exits mean-pooled with the
    batch's mask) -> export (which scores the sub-models within the budget), through the registry's
    encoder entry."""
    import json

    from conftest import cli, explain
    from test_transformers import WORDS, make_tokenizer
    from transformers import AutoModelForSequenceClassification

    make_tokenizer(tmp_path / "tok")
    rows = "".join(f"{w} {v},{'pos' if i % 2 else 'neg'}\n" for i, (w, v) in enumerate(zip(WORDS * 2, WORDS[::-1] * 2)))
    (tmp_path / "train.csv").write_text("text,label\n" + rows)
    (tmp_path / "test.csv").write_text("text,label\n" + "".join(rows.splitlines(True)[:16]))
    config = json.dumps({"model_type": "modernbert", **MODERN, "vocab_size": VOCAB, "classifier_pooling": "mean"})
    common = ["model=encoder", f"model.tokenizer={tmp_path / 'tok'}", f"+model.config={config.replace(chr(34), '').replace(' ', '')}",
              "data=text", f"data.train={tmp_path / 'train.csv'}", f"data.test={tmp_path / 'test.csv'}",
              "data.max_length=16", "dims=[depth,heads,ffn]", "dims.depth.levels=[2,4]", "dims.heads.levels=[0.5,1.0]",
              "dims.ffn.levels=[0.5,1.0]", "sampler=sortednet", "sampler.g=2", "sampler.all_exits=true",
              "optim=adamw", "trainer.batch_size=8", "trainer.max_steps=3", "trainer.epoch_eval=false"]
    p = cli(["train", *common], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    p = cli(["export", "--budget", "0.7"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    folder = next((tmp_path / "runs").glob("*/export/budget-0.7"))
    meta = json.loads((folder / "sortednet.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    assert type(model).__name__ == "ModernBertForSequenceClassification" and meta["submodel"]["heads"] == 1.0
    assert model.config.num_hidden_layers == meta["submodel"]["depth"] == len(model.config.layer_types)
