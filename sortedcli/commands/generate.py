"""``sortednet generate "prompt"``: text from a trained causal LM, streamed to the terminal.

``--exit N`` generates with the sub-model of the first N layers alone (its own KV cache);
``--speculative [--draft-exit E]`` gives the full model's output, drafted by its own first E layers
and verified in one pass (without ``--draft-exit``: the exit ``sortednet eval`` chose from measured
agreement and cost, else the shallowest exit the run trained); ``--early-exit`` lets each token
leave at the first exit whose top probability reaches its threshold (``thresholds``: trained exits
only; default the last choice cached for this checkpoint, else the paper's scaled to the depth and
moved onto the run's trained exits). ``--early-exit --max-ppl-increase X`` chooses the thresholds of
the trained exits on the first ``early_exit_items`` items of the run's test split, so that the
teacher-forced early-exit perplexity stays within (1 + X) of the full model's at the fewest
multiply-adds (:func:`sortedcli.decoding.tune_thresholds`; exits read their confidence over the
4096 most frequent training tokens where the vocabulary is 4x larger), caches the choice in
``RUN/eval/early-exit.json`` (reused by ``--early-exit`` alone) and reports the measured perplexity
increase and layer-pass saving in the closing line. Greedy unless ``temperature`` > 0 (then ``top_p``
and ``seed`` apply). See :mod:`sortedcli.decoding`.

``--ckpt`` names a run folder (or one of its checkpoints), or any model the ``model`` entry loads:
a pretrained Hugging Face folder, an export folder, a GGUF file (or a folder holding one).
``template=auto``: the tokenizer's chat template when it has one (a run trained on instructions, or
a pretrained model), the Alpaca template for a run trained on instructions without one, else the raw
prompt; an export folder uses the format its run trained on (its ``sortednet.json``); ``--raw``
(``template=none``) turns templates off. With the chat template, generation stops at its end-of-turn
token.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.console import Console

from .. import decoding as D
from .. import models, runs
from ..build import build_device, build_grid, build_sampler, plain
from ..data import LANGUAGE, lm, task_name
from ..errors import UsageError
from ..models import hf
from ..nest import COUNT
from .loaded import restore


def _model_folder(ckpt) -> Path | None:
    """``ckpt`` when it names a model rather than a run: a GGUF file, or a folder with a config.json
    (pretrained or exported) or a GGUF file in it."""
    if ckpt is None:
        return None
    path = Path(str(ckpt)).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "checkpoints").is_dir() and (
            (path / "config.json").is_file() or any(path.glob("*.gguf"))):
        return path
    return None


CLASSIFIER = {"image_classification": "image classifier", "text_classification": "text classifier"}


def _not_a_language_model(what, model: str, task: str, data: str | None = None) -> UsageError:
    kind = CLASSIFIER.get(task, task.replace("_", " ") + " model")
    on = f" (trained on {data})" if data else ""
    return UsageError(f"generate needs a causal LM; {what} is a {model} {kind}{on}: pass --ckpt a model=causal_lm "
                      "(or llama) run, its export, or a GGUF file")


def _check_generates(folder: Path) -> None:
    """A model folder that says it is a classifier (a vision export's config.json, a Hugging Face
    config's ``...ForSequenceClassification``) is refused by name, before a tokenizer is looked for
    in it (a ResNet export gave a tokenizer error)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a GGUF file or folder; or a config the loader reports on
    if not isinstance(config, dict):
        return
    if str(config.get("format", "")).startswith("sortednet-export"):  # vision exports (models/vision.py)
        model = config.get("model")
        name = model.get("name") if isinstance(model, dict) else model
        raise _not_a_language_model(folder, str(name), "image_classification", config.get("data"))
    architectures = [str(a) for a in config.get("architectures") or []]
    classifiers = [a for a in architectures if "Classification" in a]
    if classifiers and len(classifiers) == len(architectures):
        task = "image_classification" if "Image" in classifiers[0] else "text_classification"
        raise _not_a_language_model(folder, classifiers[0], task)


def load_pretrained(cfg: DictConfig, folder: Path):
    """``(stack, tokenizer, None, folder)`` of a pretrained / exported model or GGUF file."""
    if folder.is_dir():
        _check_generates(folder)
    entry = models.entry(str(cfg.model))
    if not entry.can_generate:
        raise UsageError(f"model={entry.name} is not a causal language model: generate needs e.g. model=causal_lm")
    options = {"name": entry.name, "pretrained": str(folder)}
    tokenizer = models.tokenizer(options)
    model = models.create(entry.name, **lm.model_args(tokenizer), pretrained=str(folder))
    device, _ = build_device(cfg)
    model.to(device).eval()
    return entry.stack(model), tokenizer, None, folder, None, model


def load_generator(cfg: DictConfig):
    """``(stack, tokenizer, run config, checkpoint, run folder, model)`` of what ``cfg.ckpt`` names
    (default: the newest run); the run config and folder are None for a pretrained / exported model."""
    folder = _model_folder(cfg.get("ckpt"))
    if folder is not None:
        return load_pretrained(cfg, folder)
    run_dir, ckpt = runs.resolve_checkpoint(cfg.get("ckpt"), cfg.paths.runs)
    model, tokenizer, run_cfg = run_model(run_dir, ckpt)
    device, _ = build_device(cfg)
    model.to(device).eval()
    return models.entry(run_cfg.model.name).stack(model), tokenizer, run_cfg, ckpt, run_dir, model


def run_model(run_dir: Path, ckpt: Path):
    """``(model, tokenizer, run config)`` of checkpoint ``ckpt`` of the language-model run ``run_dir``,
    on the CPU: the sorted model with the exits' own readouts (``model.exits``) and LoRA adapters
    merged, the run's own copy of its tokenizer. What generate decodes with (and
    ``benchmarks/decoding.py --model RUN``)."""
    run_cfg = runs.checkpoint_config(ckpt)
    entry = models.entry(run_cfg.model.name)
    if not entry.can_generate or run_cfg.data.name not in LANGUAGE:
        raise _not_a_language_model(run_dir, run_cfg.model.name, task_name(run_cfg.data), run_cfg.data.name)
    source = runs.self_contained(run_cfg, run_dir)  # the run's own copy of the pretrained config + tokenizer
    tokenizer = models.tokenizer(plain(source.model))
    return restore(ckpt, run_cfg, source, lm.model_args(tokenizer)), tokenizer, run_cfg  # LoRA adapters merged


def trained_exits(run_cfg, model, layers: int) -> list[int] | None:
    """The exits the run trained (its depth levels below the full depth; none when its sampler trained
    the full model alone), or None when it sorted no depth (every layer count is then untrained)."""
    if run_cfg is None:  # a pretrained / exported model: which exits were trained is unknown
        return None
    grid = build_grid(run_cfg, model)
    depth = next((d for d in grid.dims if d.kind == COUNT), None)
    if depth is None:
        return None
    return [] if build_sampler(run_cfg, grid).only_largest else [x for x in depth.levels if x < layers]


def never_trained(trained: list[int] | None, layers: int) -> str:
    """The tail of a message about an exit the run never trained: what it did train."""
    return (f"it trained {', '.join(map(str, trained))} (of {layers} layers)" if trained else
            f"it trained no exit below its {layers} layers (no depth levels, or sampler=full)")


def eval_draft(run_dir, ckpt=None) -> dict | None:
    """The draft ``sortednet eval`` chose from measurements of checkpoint ``ckpt`` (default: the
    latest; ``eval/results.json``, or ``eval/step-N/results.json`` for an older one), if any."""
    if run_dir is None:
        return None
    from ..report import results_dir

    path = (Path(run_dir) / "eval" if ckpt is None else results_dir(run_dir, ckpt)) / "results.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("draft")
    except (OSError, ValueError, AttributeError):
        return None


def draft_vocab(run_dir, n) -> torch.Tensor | None:
    """The ``n`` most frequent token ids of the run's training data (``eval/token-ranks.safetensors``)."""
    if not n:
        return None
    if run_dir is None:
        raise UsageError(f"draft_vocab={n} needs a run's token ranking (eval/token-ranks.safetensors): "
                         "give --ckpt RUN_DIR of an evaluated run, or draft_vocab=0")
    path = Path(run_dir) / "eval" / "token-ranks.safetensors"
    if not path.is_file():
        raise UsageError(f"draft_vocab={n} needs {path}: run `sortednet eval` on {run_dir} first")
    from safetensors.torch import load_file

    return load_file(str(path))["ids"][:int(n)]


def choose_draft(cfg, run_dir, trained: list[int] | None, layers: int, console: Console, ckpt=None) -> tuple:
    """``(draft exit, k, draft vocabulary or None, predicted speed-up or None)``: ``--draft-exit`` if
    given, else the eval's measured choice (with its predicted speed-up), else the shallowest trained
    exit (with a note); ``k`` if given, else the eval's, else 4; ``draft_vocab`` (N) if given (0: the
    full head), else the eval's choice."""
    k, n = cfg.get("k"), cfg.get("draft_vocab")
    if cfg.draft_exit is not None:
        if trained is not None and int(cfg.draft_exit) not in trained:
            raise UsageError(f"--draft-exit {cfg.draft_exit}: the run never trained that exit, its drafts would be "
                             f"noise; {never_trained(trained, layers)}")
        return int(cfg.draft_exit), int(k or 4), draft_vocab(run_dir, n), None
    chosen = eval_draft(run_dir, ckpt)
    if chosen and 1 <= int(chosen["exit"]) < layers and (trained is None or int(chosen["exit"]) in trained):
        n = chosen.get("vocab") if n is None else n
        console.print(f"[dim]draft exit {chosen['exit']}, k={k or chosen['k']}"
                      + (f", head over the {n} most frequent tokens" if n else "")
                      + f": chosen by `sortednet eval` (agreement {chosen['agreement']:.3f}, cost ratio "
                      f"{chosen['cost_ratio']:.2f}, predicted {chosen['speedup']:.2f}x"
                      + ("; below 1, so greedy first, probing now and then" if chosen["speedup"] < 1 else "")
                      + ")[/]")
        return int(chosen["exit"]), int(k or chosen["k"]), draft_vocab(run_dir, n), float(chosen["speedup"])
    if trained:
        console.print(f"[dim]draft exit {min(trained)}: the shallowest exit the run trained (no eval results; "
                      f"`sortednet eval` measures which exit drafts best)[/]")
        return min(trained), int(k or 4), draft_vocab(run_dir, n), None
    if run_dir is None:
        draft = max(1, round(0.3 * layers))
        console.print(f"[dim]draft exit {draft} (0.3 x {layers} layers, as the paper's 12 of 40): a model "
                      f"outside a run has no measured or trained exits; --draft-exit E chooses[/]")
        return draft, int(k or 4), draft_vocab(run_dir, n), None
    raise UsageError(f"{run_dir} trained no exit below its {layers} layers (dims has no depth levels, or "
                     "sampler=full trained the full model alone): --speculative drafts with a trained exit; train "
                     "with 'dims=[depth]' and a sampler over the sub-models")


def choose_give_up(run_dir, draft: int, vocab, ckpt=None) -> float:
    """The first-draft acceptance below which speculative decoding goes back to greedy for a while:
    the break-even acceptance of eval's chosen draft (its cost ratio and verification costs,
    :func:`sortedcli.draft.give_up`) when this is that draft, else the decoder's default."""
    from ..draft import give_up

    chosen = eval_draft(run_dir, ckpt) or {}
    same = chosen.get("exit") == draft and (chosen.get("vocab") or None) == (None if vocab is None else len(vocab))
    return give_up(chosen.get("cost_ratio"), chosen.get("verify")) if same else give_up(None, None)


def choose_check_first(cfg, run_dir, k: int, console: Console, ckpt=None) -> float:
    """``check_first`` if given, else the one the verification costs ``sortednet eval`` measured call
    for (:func:`sortedcli.draft.check_first`), else 0.5."""
    if cfg.get("check_first") is not None:
        return float(cfg.check_first)
    from ..draft import check_first, verify_cost

    verify = (eval_draft(run_dir, ckpt) or {}).get("verify")
    if not verify:
        return 0.5
    value = check_first(verify, k)
    console.print(f"[dim]check_first={value:.2f}: the first draft is checked alone while under {value:.0%} of "
                  f"them are accepted (verifying {k + 1} tokens at once was measured at "
                  f"{float(verify_cost(verify, k + 1)):.2f}x a step)[/]")
    return value


def _thresholds(cfg, layers: int, trained: list[int] | None) -> dict[int, float]:
    given = cfg.get("thresholds")
    if given is None:
        if trained is not None and not trained:
            raise UsageError("the run trained no exit below the full model (no depth levels, or sampler=full): "
                             "--early-exit needs 'thresholds={LAYER: P, ...}' or a run trained with "
                             "'dims=[depth]' and a sampler over the sub-models")
        return D.scaled_thresholds(layers, exits=trained)
    try:
        thresholds = {int(k): float(v) for k, v in dict(given).items()}
    except (TypeError, ValueError):
        raise UsageError(f"thresholds must map exit layers to probabilities, e.g. "
                         f"'thresholds={{2: 0.9, 4: 0.8}}', got {given!r}") from None
    untrained = sorted(e for e in thresholds if trained is not None and e not in trained and e != layers)
    if untrained:  # an exit the run never trained writes noise: checking it only costs time
        raise UsageError(f"thresholds name exit{'s' if len(untrained) > 1 else ''} "
                         f"{', '.join(map(str, untrained))} that the run never trained; "
                         f"{never_trained(trained, layers)}")
    return thresholds


# --- early exit's thresholds chosen from held-out data (--max-ppl-increase) ------------------------

EARLY_EXIT_FILE = "early-exit.json"  # in the run's eval/ folder: the choices, per --max-ppl-increase
EARLY_EXIT_ITEMS = 8  # held-out test items the thresholds are chosen on (early_exit_items=N)
#: what the thresholds are chosen on (:func:`held_out`), kept with each choice: a choice an earlier
#: version made on other sequences (whole instruction items) is chosen again, not reused
HELD_OUT = "test, reference answers, each item to the end of its first answer"


def check_max_ppl_increase(cfg) -> float | None:
    """``--max-ppl-increase X``: a perplexity increase in (0, 1] (0.05: at most 5% above the full
    model's), only with ``--early-exit`` and not with ``thresholds`` (it chooses them)."""
    value = cfg.get("max_ppl_increase")
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not 0 < x <= 1:  # nan fails too
        raise UsageError(f"--max-ppl-increase must be a perplexity increase in (0, 1], e.g. 0.05 for at most "
                         f"5% above the full model's, got {value!r}")
    if not cfg.early_exit:
        raise UsageError("--max-ppl-increase chooses the thresholds of --early-exit: add --early-exit")
    if cfg.get("thresholds") is not None:
        raise UsageError("--max-ppl-increase chooses the thresholds: give it or thresholds={...}, not both")
    items = cfg.get("early_exit_items", EARLY_EXIT_ITEMS)
    if isinstance(items, bool) or not isinstance(items, int) or items < 1:
        raise UsageError(f"early_exit_items must be a number of held-out items >= 1, got {items!r}")
    return x


def _checkpoint_key(ckpt) -> dict:
    """What identifies the weights a choice was made on, cheaply (no hash): the file, its size and time."""
    from ..runs import MODEL_FILE, fingerprint, sharded

    if Path(ckpt).is_dir() and sharded(ckpt):  # no one weights file: the checkpoint's cheap fingerprint
        return {"path": str(Path(ckpt).resolve()), "fingerprint": fingerprint(ckpt)}
    path = Path(ckpt) / MODEL_FILE if Path(ckpt).is_dir() else Path(ckpt)
    try:
        st = path.stat()
        return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {"path": str(path)}


def _key(x: float) -> str:
    return f"{float(x):g}"


def early_exit_choices(run_dir, ckpt) -> dict:
    """The cached choices of ``run_dir/eval/early-exit.json`` made on this checkpoint ({} if none)."""
    if run_dir is None:
        return {}
    try:
        doc = json.loads((Path(run_dir) / "eval" / EARLY_EXIT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("checkpoint") != _checkpoint_key(ckpt):
        return {}
    chosen = doc.get("chosen")
    doc["chosen"] = {k: c for k, c in chosen.items() if isinstance(c, dict) and c.get("split") == HELD_OUT} \
        if isinstance(chosen, dict) else {}
    return doc


def _save_choice(run_dir, ckpt, choice: dict) -> Path:
    import tempfile

    folder = Path(run_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    doc = early_exit_choices(run_dir, ckpt) or {"checkpoint": _checkpoint_key(ckpt), "chosen": {}}
    doc["chosen"][_key(choice["max_ppl_increase"])] = choice
    doc["last"] = _key(choice["max_ppl_increase"])
    path = folder / EARLY_EXIT_FILE
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{EARLY_EXIT_FILE}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


def held_out(run_cfg, run_dir, n: int) -> list[tuple[list[int], int]]:
    """The first ``n`` items of the run's test split (the data eval scores on) as ``(ids, score_from)``:
    an instruction example is scored on its first answer (from its first counted token to the end of
    that counted run, the sequence cut there), plain text from its second token. The test split keeps the reference answers whatever ``data.answers`` is, so a run
    trained on the model's own answers does not generate them again (or need the model that wrote them)
    to read it."""
    from omegaconf import OmegaConf

    from ..build import build_data

    data_cfg = run_cfg.data
    if data_cfg.get("answers", "reference") != "reference":
        data_cfg = OmegaConf.merge(data_cfg, {"answers": "reference"})
    data, _ = build_data(runs.self_contained(run_cfg, run_dir), data_cfg)
    out = []
    for i in range(len(data.test)):
        if len(out) >= n:
            break
        item = data.test[i]
        ids = [int(t) for t in item["input_ids"]]
        labels = None if item.get("labels") is None else [int(lab) for lab in item["labels"]]
        first = 1 if labels is None else next((j for j, lab in enumerate(labels) if lab != -100), None)
        if labels is not None and first is not None:  # scored up to the end of that answer: what follows
            end = first                                # (a template's newline, the next user turn) is not
            while end < len(ids) and labels[end] != -100:  # what the run counts
                end += 1
            ids = ids[:end]
        first = None if first is None else max(first, 1)  # the first token has nothing before it
        if first is not None and first < len(ids):
            out.append((ids, first))
    return out


def frequent(run_dir, sequences, vocab_size: int, n: int) -> list[int]:
    """The ``n`` most frequent token ids of the run's training data (eval's ``token-ranks.safetensors``),
    else of ``sequences``."""
    path = Path(run_dir) / "eval" / "token-ranks.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path))["ids"][:n].tolist()
    return D.frequent_tokens([ids for ids, _ in sequences], n, vocab_size).tolist()


def choose_early_exit(cfg, x: float, stack, run_cfg, run_dir, ckpt, trained, console: Console) -> dict:
    """The thresholds for ``--max-ppl-increase x``: cached in ``eval/early-exit.json`` for this
    checkpoint, else chosen now on held-out items (:func:`sortedcli.decoding.tune_thresholds`) and
    cached there, so that ``--early-exit`` alone reuses them."""
    if run_cfg is None:
        raise UsageError(f"--max-ppl-increase chooses thresholds on a run's held-out data for the exits it "
                         f"trained; {ckpt} is not a run: give thresholds={{LAYER: P, ...}}")
    if not trained:
        raise UsageError(f"{run_dir} trained no exit below its {stack.num_layers} layers (dims has no depth "
                         "levels, or sampler=full): --max-ppl-increase has no exits to choose thresholds for")
    cached = early_exit_choices(run_dir, ckpt).get("chosen", {}).get(_key(x))
    n = int(cfg.get("early_exit_items", EARLY_EXIT_ITEMS))
    if cached and cached.get("items") == n and cached.get("candidates") == sorted(trained) and "bound_cost_label_free" in cached:
        if early_exit_choices(run_dir, ckpt).get("last") != _key(x):
            _save_choice(run_dir, ckpt, cached)  # the last one chosen: what --early-exit alone uses
        cached["source"] = f"cached in {Path(run_dir) / 'eval' / EARLY_EXIT_FILE}"
        return cached
    with console.status(f"choosing early-exit thresholds for exits {trained} on {n} held-out items "
                        f"(perplexity within {100 * x:g}% of the full model's)"):
        sequences = held_out(run_cfg, run_dir, n)
        if not sequences:
            raise UsageError(f"{run_dir}'s test split has no item with a token to score: "
                             "--max-ppl-increase has nothing to choose on")
        V = int(stack.lm_head.weight.shape[0]) if hasattr(stack, "lm_head") else None
        vocab = None
        if V and 4 * D.CONFIDENCE_VOCAB <= V:
            vocab = frequent(run_dir, sequences, V, D.CONFIDENCE_VOCAB)
        choice = D.tune_thresholds(stack, sequences, trained, x, vocab=vocab)
    choice["thresholds"] = {str(k): v for k, v in choice["thresholds"].items()}
    choice["exits"] = {str(k): v for k, v in choice["exits"].items()}
    choice.update(vocab=vocab, candidates=sorted(trained), items=n, split=HELD_OUT)
    path = _save_choice(run_dir, ckpt, choice)
    choice["source"] = f"chosen now, saved to {path}"
    return choice


def early_exit_settings(cfg, L: int, stack, run_cfg, run_dir, ckpt, trained, console: Console) -> tuple:
    """``(thresholds, confidence vocabulary or None, note for the closing line)`` of ``--early-exit``:
    ``thresholds`` if given; ``--max-ppl-increase X``'s choice; else the last choice cached for this
    checkpoint; else the paper's thresholds moved onto the trained exits."""
    x = check_max_ppl_increase(cfg)
    choice = None
    if x is not None:
        choice = choose_early_exit(cfg, x, stack, run_cfg, run_dir, ckpt, trained, console)
    elif cfg.get("thresholds") is None:
        doc = early_exit_choices(run_dir, ckpt)
        choice = doc.get("chosen", {}).get(doc.get("last", ""))
        if choice:
            choice["source"] = f"chosen by --max-ppl-increase {choice['max_ppl_increase']:g}, cached in " \
                               f"{Path(run_dir) / 'eval' / EARLY_EXIT_FILE}"
    if choice is None:
        return _thresholds(cfg, L, trained), None, ""
    thresholds = {int(k): float(v) for k, v in choice["thresholds"].items()}
    vocab = choice.get("vocab")
    console.print(f"[dim]early-exit thresholds {', '.join(f'{k}: {v:.3f}' for k, v in thresholds.items()) or 'none (no exit pays: the full model answers)'}"
                  f" ({choice['source']})[/]")
    note = (f"; thresholds for ppl +{100 * choice['max_ppl_increase']:g}%: measured ppl "
            f"{choice['ppl_early_exit']:.3f} vs full {choice['ppl_full']:.3f} (+{100 * choice['ppl_increase']:.1f}%), "
            f"{choice['layer_passes']:.2f} of the layer passes, {choice['cost']:.2f} of the multiply-adds "
            + (f"(an oracle's floor with these exits: {choice['bound_cost']:.2f}, "
               f"{choice['bound_cost_label_free']:.2f} not knowing the next token) " if "bound_cost_label_free" in choice else "")
            + f"({choice['tokens']} tokens, {choice['sequences']} held-out items)")
    return thresholds, vocab, note


#: key -> (flag, what it must be, integer?, lowest): generate's numbers, from flags (strings) or key=value
NUMBERS = {
    "exit": ("--exit", "a number of layers, e.g. --exit 2", True, 1),
    "draft_exit": ("--draft-exit", "a number of layers, e.g. --draft-exit 2", True, 1),
    "max_tokens": ("--max-tokens", "a number of tokens >= 1, e.g. --max-tokens 64", True, 1),
    "k": ("k", "a draft length >= 1, e.g. k=4", True, 1),
    "draft_vocab": ("draft_vocab", "a number of tokens >= 0 (0: the full head)", True, 0),
    "check_first": ("check_first", "a first-draft acceptance rate in [0, 1] (0: never check alone)", False, 0),
    "seed": ("seed", "an integer", True, None),
    "temperature": ("--temperature", "a number >= 0 (0: greedy)", False, None),
    "top_p": ("--top-p", "a number in (0, 1]", False, None),
}


def check_numbers(cfg: DictConfig) -> None:
    """Refuse a number that is not one (``--exit abc`` said "invalid literal for int()"), before the
    model is loaded; ranges that depend on the model are checked where it is known."""
    for key, (flag, want, whole, lowest) in NUMBERS.items():
        value = cfg.get(key)
        if value is None:
            continue
        try:
            if isinstance(value, bool):
                raise ValueError
            number = int(str(value).strip()) if whole else float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{flag} must be {want}, got {value!r}") from None
        if (lowest is not None and number < lowest) or (key == "check_first" and number > 1):
            raise UsageError(f"{flag} must be {want}, got {value!r}")


def fit_context(prompt: int, max_tokens: int, model, console: Console) -> int:
    """``max_tokens``, capped (with a note) so that prompt and answer fit the model's context
    (``max_position_embeddings``); a prompt that fills it alone is refused."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        return max_tokens
    if prompt >= context:
        raise UsageError(f"the prompt is {prompt} tokens and the model's context is {context} positions: "
                         "shorten the prompt (the model was not trained on positions beyond its context)")
    if prompt + max_tokens > context:
        console.print(f"[yellow]--max-tokens {max_tokens} capped at {context - prompt}: the prompt's {prompt} "
                      f"tokens and the answer fill the model's context of {context} positions[/]")
        return context - prompt
    return max_tokens



class Stream:
    """Writes an answer to stdout as it is decoded (``on_token``). The whole answer is decoded each time,
    without clean-up of spaces, so that the text only grows as tokens come: byte-level pieces join up,
    and a character still cut between tokens (a U+FFFD at the end: an accent, an emoji, a CJK character
    in two or more byte tokens) waits for its other bytes instead of being written as the replacement
    character. :meth:`finish` writes what is left and the final newline."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        self._write(self.text().rstrip("\ufffd"))

    def finish(self) -> None:
        text = self.text()
        if not text.startswith(self.shown):  # rewritten before it grew past: the rest after what agrees
            self.shown = os.path.commonprefix([self.shown, text])
        self._write(text)
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _write(self, text: str) -> None:
        if text.startswith(self.shown):  # else a decoder rewrote earlier text: wait until it grows past it
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

def run(cfg: DictConfig, console: Console | None = None) -> D.Decoded:
    console = console or Console(stderr=True)
    check_numbers(cfg)
    if not isinstance(cfg.prompt, str):  # prompt=[a,b] from the command line: a list, not text
        raise UsageError(f"generate takes one prompt, got {type(cfg.prompt).__name__} {cfg.prompt}: run "
                         "`sortednet generate \"PROMPT\"` once per prompt (quote a prompt that holds [ or ,)")
    if not str(cfg.prompt).strip():
        raise UsageError('give a prompt: sortednet generate "Once upon a time"')
    if cfg.speculative and cfg.early_exit:
        raise UsageError("choose one of --speculative and --early-exit")
    if cfg.exit is not None and (cfg.speculative or cfg.early_exit):  # each picks its own exits
        mode = "--speculative" if cfg.speculative else "--early-exit"
        raise UsageError(f"--exit and {mode} are different modes: choose one (--exit N: the first N layers alone; "
                         "--speculative: the full model drafted by --draft-exit E; --early-exit: each token's own exit)")
    if cfg.draft_exit is not None and not cfg.speculative:
        raise UsageError("--draft-exit is the draft of --speculative: add --speculative (or drop --draft-exit)")
    if cfg.get("check_first") is not None and not cfg.speculative:
        raise UsageError("check_first tunes the verification of --speculative: add --speculative (or drop check_first)")
    if cfg.get("thresholds") is not None and not cfg.early_exit:
        raise UsageError("thresholds are the exits of --early-exit: add --early-exit (or drop thresholds)")
    check_max_ppl_increase(cfg)
    stack, tokenizer, run_cfg, ckpt, run_dir, model = load_generator(cfg)
    L = stack.num_layers
    trained = trained_exits(run_cfg, model, L)
    template = cfg.template
    instructions = run_cfg is None or run_cfg.data.get("kind") == "instructions"
    if template == "auto":
        exported = hf.export_record(ckpt) if run_cfg is None else {}
        if exported.get("kind") in ("text", "instructions"):  # an export: the format its run trained on
            chat = exported.get("template") == "chat" and lm.has_chat_template(tokenizer)
            template = "none" if exported["kind"] == "text" else "chat" if chat else "alpaca"
        elif instructions and lm.has_chat_template(tokenizer) and (run_cfg is None or not run_cfg.data.get("raw")):
            template = "chat"
        else:
            template = "alpaca" if run_cfg is not None and instructions else "none"
    if template not in ("chat", "alpaca", "none"):
        raise UsageError(f"template must be auto, chat, alpaca or none, got {template!r}")
    if template == "chat" and not lm.has_chat_template(tokenizer):
        raise UsageError("template=chat: this tokenizer has no chat template (use template=alpaca or --raw)")
    eos = lm.stop_tokens(tokenizer, template == "chat")
    if template == "chat":
        ids = lm.chat_prompt_ids(tokenizer, str(cfg.prompt))
    else:
        text = lm.alpaca_prompt(str(cfg.prompt)) if template == "alpaca" else str(cfg.prompt)
        ids = tokenizer(text).input_ids
    generator = torch.Generator().manual_seed(int(cfg.seed))
    try:
        sampling = D.Sampling(float(cfg.temperature), float(cfg.top_p), generator)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if sampling.greedy and sampling.top_p < 1:  # top-p restricts what is sampled: greedy samples nothing
        console.print(f"[yellow]--top-p {sampling.top_p:g} has no effect on greedy decoding: add --temperature T "
                      "(> 0) to sample[/]")

    stream = Stream(tokenizer)
    max_tokens = fit_context(len(ids), int(cfg.max_tokens), model, console)
    common = dict(max_new_tokens=max_tokens, sampling=sampling, eos=eos, on_token=stream)
    started = time.perf_counter()
    chosen_note = ""
    try:
        if cfg.speculative:
            at = ckpt if run_dir is not None else None  # the measurements of the checkpoint decoding
            draft, k, vocab, expected = choose_draft(cfg, run_dir, trained, L, console, at)
            first = choose_check_first(cfg, run_dir, k, console, at)
            mode = f"self-speculative, draft exit {draft} of {L}" + ("" if vocab is None else f", draft vocab {len(vocab)}")
            out = D.speculative(stack, ids, draft_exit=draft, k=k, draft_vocab=vocab, check_first=first,
                                expected=expected, give_up=choose_give_up(run_dir, draft, vocab, at), **common)
        elif cfg.early_exit:
            thresholds, vocab, chosen_note = early_exit_settings(cfg, L, stack, run_cfg, run_dir, ckpt, trained,
                                                                  console)
            started = time.perf_counter()  # choosing thresholds is not decoding
            shown_thresholds = {k: round(v, 3) for k, v in thresholds.items()}
            mode = f"early exit, thresholds {shown_thresholds}" + ("" if vocab is None else
                                                                   f", confidence over the {len(vocab)} most frequent tokens")
            out = D.early_exit(stack, ids, thresholds=thresholds, vocab=vocab, **common)
        else:
            exit = L if cfg.exit is None else int(cfg.exit)
            if trained is not None and exit < L and exit not in trained:
                console.print(f"[yellow]exit {exit}: the run never trained it, so expect noise; "
                              f"{never_trained(trained, L)}[/]")
            mode = f"exit {exit} of {L} layers"
            out = D.generate(stack, ids, exit=exit, **common)
    except ValueError as e:
        raise UsageError(str(e)) from None
    seconds = time.perf_counter() - started
    stream.finish()
    extra = ""
    if out.drafted:
        extra = f"; acceptance {out.acceptance:.2f} ({out.accepted}/{out.drafted} drafts, {out.rounds} rounds)"
    if cfg.speculative and out.greedy_tokens > 2:
        extra += f"; {out.greedy_tokens} tokens decoded greedily (drafting measured slower here)"
    if out.exits:
        extra = (f"; exits of the {sum(out.exits.values())} tokens after the first (which the prompt's pass gives) "
                 + ", ".join(f"{k}: {v}" for k, v in sorted(out.exits.items())))
        used = sum(k * v for k, v in out.exits.items()) / sum(out.exits.values()) / L
        extra += f" ({used:.2f} of the layer passes){chosen_note}"
    console.print(f"[dim]{len(out.tokens)} tokens in {seconds:.2f}s ({len(out.tokens) / seconds:.1f} tokens/s), "
                  f"{mode}, {'greedy' if sampling.greedy else f'temperature {sampling.temperature}'}"
                  f"{', stopped at EOS' if out.stopped_at_eos else ''}{extra}; {ckpt}[/]")
    return out
