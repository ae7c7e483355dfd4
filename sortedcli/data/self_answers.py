"""The model's own answers as training data (``data.answers=self``): what the exits of SoFT should imitate.

Speculative decoding accepts a draft when the exit writes what the full model would write. Training the
exits on reference answers asks them for something else (and pulls the full model away from what it
says); training them on the untouched model's *own* greedy answers to the same prompts asks them to
learn exactly what the full model writes, and leaves the full model near its optimum (it already writes
those answers). So with ``data.answers=self`` the response of every training and validation example is
replaced by the greedy answer of ``data.answers_model`` (by default ``model.pretrained``: the model
before any training) to that example's prompt:

- **the prompt** is what the example is trained with: with a chat template, the conversation up to the
  answered assistant turn rendered with the generation prompt (the user's turn(s), then the assistant's
  turn opened); with ``data.raw=true`` (or a tokenizer without a template) the untrained text before the
  answer (the Alpaca prompt, the ``### Role:`` turns). In a conversation of several turns the last
  assistant turn is answered, the earlier ones (people's) stay as context and are not trained on.
- **decoding**: greedy, float32, ``data.answers_max_tokens`` new tokens at most, stopping at the end of
  the assistant's turn (the template's end-of-turn token, or EOS); prompts in batches of
  ``data.answers_batch_size`` sorted by length, left-padded, with a KV cache; a row whose answer has
  ended leaves the batch (its cache rows are dropped). An answer cut at the token limit is kept with its
  end not trained on (no end-of-turn the model never wrote).
- **the cache**: one JSON file per (model files, tokenizer, generation settings) in
  ``answers/`` of the LLM cache (:func:`~sortedcli.data.lm.llm_cache`, or ``data.cache_dir``),
  answers keyed by the prompt's token ids, so a second run (or a resume, eval, another subset of the
  same prompts) reuses them and only new prompts are generated. The file is rewritten atomically after
  every batch (an interrupted generation goes on where it stopped), under a lock (ranks of one run, or
  two runs, generate once). The model's identity is its files' paths, sizes and modification times (a
  hub id: the id): rewriting the weights generates again.
- **the held-out test split keeps the reference answers**: ``test_perplexity`` stays comparable with
  runs trained on reference answers (SFT, SoFT) and is the full model's quality on what people wrote;
  how well the exits imitate the full model is what eval's ``agreement`` / ``agreement_initial`` report
  on it. The validation split (export's choice) holds the model's own answers, as training does.

Refused in one line before anything is written: an unknown ``data.answers``, ``self`` without a
starting model (a random init has nothing to imitate), on plain text (no prompts: distillation needs
no answers there, ``distill.enabled=true`` on ``data=news``), a run's weightless ``pretrained/`` copy,
and a bad ``answers_max_tokens`` / ``answers_batch_size``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sortedcli.errors import UsageError

ANSWERS = ("reference", "self")
FORMAT = 1  # of the cache files: a change of what a file holds or how answers are made bumps it
MAX_NEW_TOKENS = 256  # data.answers_max_tokens when unset: GSM8K's reference answers are ~120 tokens
BATCH_SIZE = 8  # data.answers_batch_size when unset


@dataclass(frozen=True)
class Settings:
    """What ``data.answers=self`` generates with (the model named as given, and its identity)."""

    model: str
    max_new_tokens: int
    batch_size: int


def _positive(cfg, key: str, default: int) -> int:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"data.{key} must be a positive integer, got {value!r}")
    return value


def settings(cfg, name: str, kind: str) -> Settings | None:
    """``data.answers`` checked against the source and the model: None for reference answers."""
    answers = cfg.get("answers") or "reference"
    if answers not in ANSWERS:
        raise UsageError(f"data.answers must be reference (the data's own answers) or self (the starting model's "
                         f"own greedy answers), got {answers!r}")
    if answers == "reference":
        return None
    if kind != "instructions":
        raise UsageError(f"data.answers=self answers prompts, and data={name} is plain text with none: train on it "
                         "as it is (labels are the text itself; add distill.enabled=true to imitate the full model)")
    model = cfg.get("answers_model")
    if not model:
        raise UsageError("data.answers=self trains on the starting model's own answers, and this model starts from "
                         "a random init (no model.pretrained): nothing to imitate; pass model.pretrained=DIR or "
                         "use data.answers=reference")
    from sortedcli.models import hf

    local = Path(str(model)).expanduser()
    if local.is_dir() and hf.is_snapshot(local):
        raise UsageError(f"data.answers_model={model} is a run's copy of a config and tokenizer without weights: "
                         "name the pretrained model itself (a folder with weights, a GGUF file or a hub id)")
    return Settings(str(model), _positive(cfg, "answers_max_tokens", MAX_NEW_TOKENS),
                    _positive(cfg, "answers_batch_size", BATCH_SIZE))


# ---------------------------------------------------------------- prompts and answers
def answered(example) -> int:
    """The index of the segment whose text the model's answer replaces: the last trained one."""
    return max(i for i, (_, trained) in enumerate(example.segments) if trained)


def prompt_example(example):
    """``example`` without its answer: the untrained text before the answered segment, and the
    conversation up to the answered (last) assistant message."""
    from sortedcli.data.lm import Example

    j = answered(example)
    roles = [role for role, _ in example.messages]
    m = len(roles) - 1 - roles[::-1].index("assistant") if "assistant" in roles else len(roles)
    return Example(tuple((text, False) for text, _ in example.segments[:j]), example.messages[:m])


def with_answer(example, text: str, ended: bool):
    """``example`` whose answered segment (and assistant message) is ``text``; everything before it is
    context, not trained on. ``ended=False`` (cut at the token limit): its end is not trained on."""
    from sortedcli.data.lm import Example

    prompt = prompt_example(example)
    return Example(prompt.segments + ((text, True),), prompt.messages + (("assistant", text),),
                   open_end=not ended, last_only=True)


def prompt_ids(tokenizer, example, template: bool) -> list[int]:
    """The token ids the model answers: what the training example holds before its answer."""
    from sortedcli.data.lm import _encode, _render

    prompt = prompt_example(example)
    if template:
        return _encode(tokenizer, [_render(tokenizer, prompt.messages, True)])[0]
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for seg in _encode(tokenizer, [text for text, _ in prompt.segments]):
        ids += seg
    return ids


def stop_ids(tokenizer, template: bool) -> set[int]:
    """Where an answer ends: the end of the assistant's turn (template) and EOS."""
    from sortedcli.data.lm import stop_tokens

    return stop_tokens(tokenizer, template)


# ---------------------------------------------------------------- generation
@torch.no_grad()
def greedy(model, prompts: list[list[int]], stop: set[int], max_new_tokens: int, pad_id: int,
           device: torch.device | None = None) -> list[tuple[list[int], bool]]:
    """Greedy answers of a transformers causal LM to a batch of prompts: ``(new token ids without the
    stop token, ended at a stop token)`` per prompt. Left-padded, one KV cache; a finished row leaves the
    batch (its cache rows are dropped), so long answers do not make short ones pay."""
    from transformers import DynamicCache

    device = device or next(model.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    rows = list(range(n))  # the prompts still answering, in batch order
    out: list[list[int]] = [[] for _ in range(n)]
    ended = [False] * n
    position = positions[:, -1] + 1
    while True:
        token = logits.argmax(-1)
        keep = []
        for j, (row, t) in enumerate(zip(rows, token.tolist())):
            if t in stop:
                ended[row] = True
                continue
            out[row].append(t)
            if len(out[row]) < max_new_tokens:
                keep.append(j)
        if not keep:
            return list(zip(out, ended))
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            token, mask, position = token[index], mask[index], position[index]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                       cache=cache, use_cache=True).logits[:, -1]
        position = position + 1


def identity(model: str) -> dict:
    """What names the model's weights, tokenizer and config: for a local file or folder, each file's
    name, size and modification time (a folder's files, not its sub-folders); a hub id as given."""
    local = Path(model).expanduser()
    if not local.exists():
        return {"hub": model}
    files = [local] if local.is_file() else sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"path": str(local.resolve()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def tokenizer_identity(tokenizer) -> str:
    """A digest of what turns text into ids and back: the vocabulary, special tokens and chat template."""
    text = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.all_special_tokens)),
                       getattr(tokenizer, "chat_template", None), type(tokenizer).__name__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _key(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:32]


def _write(path: Path, content: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from the user's other accounts' reads
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (created), held for the block: one process generates, the others
    wait and then find its answers in the cache."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(model: str):
    from transformers import AutoModelForCausalLM

    from sortedcli.models import hf

    return hf.load(AutoModelForCausalLM, model, None, None, attn_implementation="sdpa").float().eval()


def answers(settings: Settings, tokenizer, prompts: list[list[int]], stop: set[int], folder: Path,
            chosen_by: str | None = None) -> tuple[list[tuple[str, bool]], dict]:
    """``(text, ended)`` for each prompt (token ids), from the cache where it has them, generated (and
    cached) otherwise; and counts for the run's header (generated, cached, cut at the limit, seconds)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    from sortedcli.cache import make_dir

    spec = {"format": FORMAT, "model": identity(settings.model), "tokenizer": tokenizer_identity(tokenizer),
            "stop": sorted(stop), "max_new_tokens": settings.max_new_tokens, "decoding": "greedy, float32"}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    folder = make_dir(Path(folder), chosen_by)
    path = folder / f"answers-{digest}.json"
    keys = [_key(p) for p in prompts]
    info = {"answers_generated": 0, "answers_seconds": 0.0}

    def read() -> dict:
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return stored.get("answers", {}) if stored.get("spec") == spec else {}

    stored = read()
    if any(k not in stored for k in keys):
        with _locked(folder / f".answers-{digest}.lock"):
            stored = read()  # another process may have generated them while this one waited
            todo = sorted({k: p for k, p in zip(keys, prompts) if k not in stored}.items(), key=lambda kv: -len(kv[1]))
            if todo:
                started = time.perf_counter()
                device = _device()
                model = _load(settings.model).to(device)
                if model.config.vocab_size < len(tokenizer):
                    raise UsageError(f"data.answers_model={settings.model} has {model.config.vocab_size} tokens, the "
                                     f"tokenizer {len(tokenizer)}: the answers must come from the model of this tokenizer")
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                with Progress(TextColumn(f"the model's own answers ({Path(settings.model).name}, {device.type})"),
                              BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tokens]} tokens"),
                              TimeElapsedColumn(), TimeRemainingColumn()) as bar:
                    job = bar.add_task("answers", total=len(todo), tokens=0)
                    made = 0
                    for start in range(0, len(todo), settings.batch_size):
                        batch = todo[start:start + settings.batch_size]
                        done = greedy(model, [p for _, p in batch], stop, settings.max_new_tokens, pad, device)
                        for (k, _), (new, ended) in zip(batch, done):
                            stored[k] = {"text": tokenizer.decode(new, skip_special_tokens=False), "ended": ended,
                                         "tokens": len(new)}
                            made += len(new)
                        _write(path, {"spec": spec, "answers": stored})
                        bar.update(job, advance=len(batch), tokens=made)
                info = {"answers_generated": len(todo), "answers_seconds": round(time.perf_counter() - started, 1)}
    got = [stored[k] for k in keys]
    info.update(answers_cached=len(keys) - info["answers_generated"], answers_cut=sum(not a["ended"] for a in got),
                answer_tokens=sum(a["tokens"] for a in got), answers_file=str(path))
    return [(a["text"], a["ended"]) for a in got], info


def replace_answers(settings: Settings, tokenizer, parts: list[list], template: bool, folder: Path,
                    chosen_by: str | None = None) -> tuple[list[list], dict]:
    """Each part (train, validation) with every example's answer replaced by the model's own."""
    flat = [ex for part in parts for ex in part]
    if not flat:
        return parts, {}
    prompts = [prompt_ids(tokenizer, ex, template) for ex in flat]
    got, info = answers(settings, tokenizer, prompts, stop_ids(tokenizer, template), folder, chosen_by)
    made = iter(with_answer(ex, text, ended) for ex, (text, ended) in zip(flat, got))
    if os.environ.get("RANK", "0") == "0":
        from rich.console import Console

        Console().print(f"data.answers=self: {len(flat)} answers of {settings.model} ({info['answers_generated']} "
                        f"generated in {info['answers_seconds']} s, {info['answers_cached']} from the cache "
                        f"{info['answers_file']}), {info['answers_cut']} cut at {settings.max_new_tokens} tokens",
                        soft_wrap=True, highlight=False)
    return [[next(made) for _ in part] for part in parts], {"answers": "self", **info}


__all__ = ["ANSWERS", "Settings", "settings", "greedy", "replace_answers", "answers", "identity", "with_answer",
           "prompt_ids", "stop_ids", "prompt_example"]
