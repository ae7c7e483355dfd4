"""The model's own answers as training data (issue 21 item 3, ``data.answers=self``): the untouched
model's greedy answers replace the responses of the training and validation examples, generated once in
batches (left padding, one KV cache) and cached in the user cache; the test split keeps the reference
answers. chitchat-dataset's conversations as chat data. Tiny random LLaMAs with a ChatML tokenizer
(weights drawn wide, so that greedy answers vary from prompt to prompt)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CLI_ENV, cli, each_refused, explain, run_folders
from test_smollm import CORPUS, chatml_tokenizer
from sortedcli.data import lm
from sortedcli.data.self_answers import greedy
from sortedcli.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 1.0}
QA = [{"instruction": f"What is {a} plus {b}?" + " Think." * a, "output": f"{a} plus {b} is {a + b}."}
      for a in range(6) for b in range(3)]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A pretrained-style folder (a random tiny LlamaForCausalLM and a ChatML tokenizer) and an Alpaca file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("selfanswers")
    tok = chatml_tokenizer(root / "bpe")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **TINY)
    LlamaForCausalLM(config).save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    (root / "qa.json").write_text(json.dumps(QA))
    return root


def _model(home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(home / "model"), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(home / "model")))


def _hf_greedy(model, prompt: list[int], stop: set[int], n: int) -> tuple[list[int], bool]:
    """transformers' own greedy generate of one unpadded prompt: (new tokens without the stop, stopped)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(stop), pad_token_id=0)[0, len(prompt):].tolist()
    return (out[:-1], True) if out and out[-1] in stop else (out, False)


def _config(home, tmp_path, **extra):
    from omegaconf import OmegaConf

    from sortedcli.cli import CONF_DIR

    cfg = OmegaConf.load(CONF_DIR / "data" / "alpaca.yaml")
    cfg.path, cfg.test_fraction, cfg.val_fraction = str(home / "qa.json"), 0.2, 0.2
    cfg.answers, cfg.answers_model, cfg.answers_max_tokens = "self", str(home / "model"), 10
    cfg.cache_dir = str(tmp_path / "cache")
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def test_batched_left_padded_greedy_is_transformers_generate_prompt_by_prompt(home):
    """12 prompts of 4 lengths in one batch; the stop set holds the end of turn and a token the model does
    write, so that some rows end (and leave the batch) early while others run to the limit."""
    model, tok = _model(home)
    prompts = [lm.chat_prompt_ids(tok, f"What is {a} plus {b}?" + " Think." * a) for a in range(4) for b in range(3)]
    first = {_hf_greedy(model, p, {lm.end_of_turn(tok)}, 4)[0][2] for p in prompts}
    stop = {lm.end_of_turn(tok), sorted(first)[0]}
    got = greedy(model, prompts, stop, 16, tok.pad_token_id)
    want = [_hf_greedy(model, p, stop, 16) for p in prompts]
    assert got == want
    assert any(ended for _, ended in got) and not all(ended for _, ended in got)
    assert len({tuple(new) for new, _ in got}) > 6  # the answers differ from prompt to prompt


def test_answers_are_the_models_own_generated_once_cached_and_reused(home, tmp_path):
    model, tok = _model(home)
    cfg = _config(home, tmp_path)
    data = lm.build_lm_data(cfg, tokenizer=tok)
    n = data.info["train_items"] + data.info["val_items"]
    assert data.info["answers_generated"] == n and data.info["answers_cached"] == 0
    files = list((tmp_path / "cache" / "answers").glob("answers-*.json"))
    assert len(files) == 1 and files[0] == type(files[0])(data.info["answers_file"])
    stored = json.loads(files[0].read_text())["answers"]
    assert len(stored) == n
    eot = lm.end_of_turn(tok)
    ref = lm.build_lm_data({**_config(home, tmp_path), "answers": "reference"}, tokenizer=tok)
    # each training example is its prompt (as reference training renders it) + the model's own greedy answer
    for (ids, labels), (ref_ids, ref_labels) in zip(data.train.pairs, ref.train.pairs):
        start = next(i for i, x in enumerate(ref_labels) if x != -100)
        prompt = ref_ids[:start]
        assert ids[:start] == prompt
        new, ended = _hf_greedy(model, prompt, {eot, tok.eos_token_id}, 10)
        answer = tok.decode(new, skip_special_tokens=False)
        trained = tok.decode([x for x in labels if x != -100], skip_special_tokens=False)
        assert trained == answer + ("<|im_end|>" if ended else "")  # a cut answer's end is not trained
    assert data.info["answers_cut"] > 0  # 10 tokens: the random model does not end its turn that soon
    # the test split keeps the reference answers; validation holds the model's own
    assert data.test.pairs == ref.test.pairs
    assert data.val.pairs != ref.val.pairs
    # a second build reads the cache: nothing generated, the file untouched
    before = files[0].stat().st_mtime_ns
    again = lm.build_lm_data(cfg, tokenizer=tok)
    assert again.info["answers_generated"] == 0 and again.info["answers_cached"] == n
    assert again.train.pairs == data.train.pairs and files[0].stat().st_mtime_ns == before
    # other generation settings are another file; a subset of the same prompts generates nothing new
    fewer = lm.build_lm_data(_config(home, tmp_path, train_subset=3), tokenizer=tok)
    assert fewer.info["answers_generated"] == 0
    longer = lm.build_lm_data(_config(home, tmp_path, answers_max_tokens=11, train_subset=2, val_fraction=0),
                              tokenizer=tok)
    assert longer.info["answers_generated"] == 2
    assert len(list((tmp_path / "cache" / "answers").glob("answers-*.json"))) == 2


def test_raw_format_answers_the_alpaca_prompt_and_trains_no_end_on_a_cut_answer(home, tmp_path):
    model, tok = _model(home)
    data = lm.build_lm_data(_config(home, tmp_path, raw=True, val_fraction=0), tokenizer=tok)
    ids, labels = data.train.pairs[0]
    start = next(i for i, x in enumerate(labels) if x != -100)
    assert tok.decode(ids[:start]).startswith("<|im_start|>Below is an instruction")
    new, ended = _hf_greedy(model, ids[:start], {tok.eos_token_id}, 10)
    trained = [x for x in labels if x != -100]  # the answer's text, tokenized again as training data is
    assert tok.decode(trained) == tok.decode(new + [tok.eos_token_id] if ended else new)
    assert ended or trained[-1] != tok.eos_token_id


CHITCHAT = {
    f"c{i}": {"messages": [[{"text": "Hello?", "sender": "a"}],
                           [{"text": "hi", "sender": "b"}, {"text": f"how are you {i}?", "sender": "b"}],
                           [{"text": f"fine {i}", "sender": "a"}],
                           [{"text": "good", "sender": "b"}],
                           [{"text": "bye", "sender": "a"}]], "prompt": "Say hi", "start": "2018"}
    for i in range(10)}


def test_chitchat_conversations_are_chats_of_their_first_turns(home, tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({**CHITCHAT, "lone": {"messages": [[{"text": "anyone?", "sender": "a"}]]}}))
    examples = lm.read_chitchat(path, turns=4)
    assert len(examples) == 10  # the conversation without an answer is skipped
    assert examples[3].messages == (("user", "Hello?"), ("assistant", "hi\nhow are you 3?"),
                                    ("user", "fine 3"), ("assistant", "good"))
    assert [m[0] for m in lm.read_chitchat(path, turns=5)[0].messages][-1] == "assistant"  # a last user turn dropped
    with pytest.raises(UsageError, match="data.turns must be an integer >= 2"):
        lm.read_chitchat(path, turns=1)
    from omegaconf import OmegaConf

    from sortedcli.cli import CONF_DIR

    model, tok = _model(home)
    cfg = OmegaConf.load(CONF_DIR / "data" / "chitchat.yaml")
    cfg.path, cfg.turns, cfg.test_fraction, cfg.val_fraction = str(path), 4, 0.2, 0
    ref = lm.build_lm_data(cfg, tokenizer=tok)
    text = tok.decode([x for x in ref.train.pairs[0][1] if x != -100])
    assert text.startswith("hi\nhow are you") and text.endswith("good<|im_end|>")  # both answers trained
    cfg.answers, cfg.answers_model, cfg.answers_max_tokens, cfg.cache_dir = "self", str(home / "model"), 6, \
        str(tmp_path / "cache")
    mine = lm.build_lm_data(cfg, tokenizer=tok)
    ids, labels = mine.train.pairs[0]
    start = next(i for i, x in enumerate(labels) if x != -100)
    # the model answers the conversation so far; the person's earlier answer is context only
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\nhi\nhow are you 0?<|im_end|>\n"
                                            "<|im_start|>user\nfine 0<|im_end|>\n<|im_start|>assistant\n")
    new, ended = _hf_greedy(model, ids[:start], {lm.end_of_turn(tok)}, 6)
    assert tok.decode([x for x in labels if x != -100]) == tok.decode(new) + ("<|im_end|>" if ended else "")


def _env(tmp_path) -> dict:
    return {**CLI_ENV, "SORTEDNET_CACHE": str(tmp_path / "cache")}


def _cli(args, cwd, tmp_path):
    return cli(args, cwd, env=_env(tmp_path))


def test_cli_trains_on_the_models_own_answers_and_eval_reuses_them(home, tmp_path):
    args = ["train", "model=llama", f"model.pretrained={home / 'model'}", "data=alpaca", f"data.path={home / 'qa.json'}",
            "data.test_fraction=0.2", "data.answers=self", "data.answers_max_tokens=8", "dims=[depth]",
            "dims.depth.levels=[2,4]", "sampler=all", "optim=adamw", "trainer.batch_size=4", "trainer.max_steps=2",
            "trainer.log_every=1", "trainer.epoch_eval=false", "eval.batch_size=8"]
    p = _cli(args, tmp_path, tmp_path)
    assert p.returncode == 0, explain(p)
    files = list((tmp_path / "cache" / "llm" / "answers").glob("answers-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["answers"]) == 14  # training + validation prompts
    run = run_folders(tmp_path / "runs")[0]
    assert "data.answers=self: 14 answers of" in p.stdout and "(14 generated in" in p.stdout
    before = files[0].stat().st_mtime_ns
    e = _cli(["eval", "--all-submodels", "--ckpt", run, "eval.latency.reps=1", "eval.latency.warmup=0",
              "eval.samples=1", "eval.sample_tokens=2"], tmp_path, tmp_path)
    assert e.returncode == 0, explain(e)
    assert files[0].stat().st_mtime_ns == before and "(0 generated in 0.0 s, 14 from the cache" in e.stdout
    rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    assert {r["dims"]["depth"] for r in rows} == {2, 4}
    # choosing early-exit thresholds reads the held-out reference answers only: with the answers' cache
    # gone and the model that wrote them moved, nothing is generated again and nothing is missed
    files[0].unlink()
    (home / "model").rename(home / "moved")
    try:
        g = _cli(["generate", "--ckpt", run, "--early-exit", "--max-ppl-increase", "0.5", "--max-tokens", "3",
                  "What is 1 plus 2?"], tmp_path, tmp_path)
    finally:
        (home / "moved").rename(home / "model")
    assert g.returncode == 0, explain(g)
    assert not list((tmp_path / "cache" / "llm" / "answers").glob("answers-*.json"))
    assert json.loads((run / "eval" / "early-exit.json").read_text())["last"] == "0.5"
    # the thresholds are chosen on the answers alone: each held-out chat ends with its <|im_end|>, not
    # with the template's newline after it
    from omegaconf import OmegaConf

    from sortedcli.commands.generate import held_out

    end = _model(home)[1].convert_tokens_to_ids("<|im_end|>")
    items = held_out(OmegaConf.load(run / "config.yaml"), run, 3)
    assert len(items) == 3 and all(ids[-1] == end and 1 <= first < len(ids) for ids, first in items)


BAD = {
    "random-init": (["model=llama_tiny", "model.tokenizer={model}", "data=alpaca", "data.path={qa}",
                     "data.answers=self"], "this model starts from a random init (no model.pretrained): nothing "
                                           "to imitate"),
    "plain-text": (["model=llama", "model.pretrained={model}", "data=corpus", "data.path={text}",
                    "data.answers=self"], "data.answers=self answers prompts, and data=corpus is plain text"),
    "max-tokens-0": (["model=llama", "model.pretrained={model}", "data=alpaca", "data.path={qa}", "data.answers=self",
                      "data.answers_max_tokens=0"], "data.answers_max_tokens must be a positive integer, got 0"),
    "max-tokens-abc": (["model=llama", "model.pretrained={model}", "data=alpaca", "data.path={qa}",
                        "data.answers=self", "data.answers_max_tokens=lots"],
                       "data.answers_max_tokens must be a positive integer, got 'lots'"),
    "unknown": (["model=llama", "model.pretrained={model}", "data=alpaca", "data.path={qa}", "data.answers=mine"],
                "data.answers must be reference (the data's own answers) or self"),
}


def test_bad_answer_settings_are_one_line_exit_2_and_write_nothing(home, tmp_path):
    (home / "text.txt").write_text("\n\n".join(CORPUS * 8))
    names = {"model": home / "model", "qa": home / "qa.json", "text": home / "text.txt"}

    def one(case):
        folder = tmp_path / case
        folder.mkdir()
        args = [a.format(**names) for a in BAD[case][0]]
        return _cli(["train", "dims=[depth]", *args], folder, tmp_path), folder

    each_refused(BAD, one)
    assert not (tmp_path / "cache" / "llm" / "answers").exists()


def test_a_data_config_without_a_model_names_none(tmp_path):
    """``answers_model`` follows ``model.pretrained`` (null for a random init) in every instruction config."""
    from hydra import compose, initialize_config_dir

    from sortedcli.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        for name in ("gsm8k", "alpaca", "chat", "chitchat"):
            cfg = compose(config_name="train", overrides=[f"data={name}", "model=llama", "model.pretrained=/x/y"])
            assert cfg.data.answers == "reference" and cfg.data.answers_model == "/x/y"
            cfg = compose(config_name="train", overrides=[f"data={name}", "model=llama_tiny"])
            assert cfg.data.answers_model is None


def test_a_runs_config_copy_is_refused_and_the_same_folder_with_weights_is_read(home, tmp_path):
    """A run's ``pretrained/`` (config and tokenizer, marked, no weights) has nothing to answer with: one
    line. Put a model's weights beside it (as the study hands a checkpoint's full model to transformers)
    and it is a model like any other, for the answers and for every ``hf.load``: its weights, not a
    random init."""
    from transformers import AutoModelForCausalLM

    from sortedcli.data.self_answers import settings
    from sortedcli.models import hf

    model, tok = _model(home)
    copy = tmp_path / "pretrained"
    hf.snapshot(model, tok, copy, str(home / "model"))
    assert hf.is_snapshot(copy)
    (copy / "initial.safetensors").write_bytes(b"")  # a teacher's starting weights: not transformers' weights
    assert hf.is_snapshot(copy)
    with pytest.raises(UsageError, match="without weights") as e:
        settings(_config(home, tmp_path, answers_model=str(copy)), "alpaca", "instructions")
    assert "\n" not in str(e.value)
    (copy / "model.safetensors").symlink_to(home / "model" / "model.safetensors")
    assert not hf.is_snapshot(copy)
    assert settings(_config(home, tmp_path, answers_model=str(copy)), "alpaca", "instructions").model == str(copy)
    loaded = hf.load(AutoModelForCausalLM, str(copy), None, None)
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
