"""``sortednet generate "prompt"``: text from a trained causal LM, streamed to the terminal.

``--exit N`` generates with the sub-model of the first N layers alone (its own KV cache);
``--speculative [--draft-exit E]`` gives the full model's output, drafted by its own first E layers
and verified in one pass (without ``--draft-exit``: the exit ``sortednet eval`` chose from measured
agreement and cost, else the shallowest exit the run trained); ``--early-exit`` lets each token
leave at the first exit whose top probability reaches its threshold (``thresholds``, default the
paper's scaled to the depth and moved onto the run's trained exits). Greedy unless ``temperature``
> 0 (then ``top_p`` and ``seed`` apply). See :mod:`sortedcli.decoding`.

``--ckpt`` names a run folder (or one of its checkpoints), or any model the ``model`` entry loads:
a pretrained Hugging Face folder, an export folder, a GGUF file (or a folder holding one).
``template=auto``: the tokenizer's chat template when it has one (a run trained on instructions, or
a pretrained/exported model), the Alpaca template for a run trained on instructions without one,
else the raw prompt; ``--raw`` (``template=none``) turns templates off. With the chat template,
generation stops at its end-of-turn token.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from rich.console import Console

from .. import decoding as D
from .. import models, runs
from ..build import build_device, build_grid, build_model, plain
from ..data import LANGUAGE, lm
from ..errors import UsageError
from ..nest import COUNT


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


def load_pretrained(cfg: DictConfig, folder: Path):
    """``(stack, tokenizer, None, folder)`` of a pretrained / exported model or GGUF file."""
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
    weights, run_cfg = runs.load_weights(ckpt)
    entry = models.entry(run_cfg.model.name)
    if not entry.can_generate or run_cfg.data.name not in LANGUAGE:
        raise UsageError(f"{run_dir} is a {run_cfg.model.name} run on {run_cfg.data.name}, not a causal language "
                         "model: `sortednet generate` needs a model=causal_lm (or llama) run")
    source = runs.self_contained(run_cfg, run_dir)  # the run's own copy of the pretrained config + tokenizer
    tokenizer = models.tokenizer(plain(source.model))
    model = build_model(source, lm.model_args(tokenizer))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UsageError(f"checkpoint {ckpt} does not fit {run_cfg.model.name}: {str(e).splitlines()[0]}") from None
    device, _ = build_device(cfg)
    model.to(device).eval()
    return entry.stack(model), tokenizer, run_cfg, ckpt, run_dir, model


def trained_exits(run_cfg, model, layers: int) -> list[int] | None:
    """The exits the run trained (its depth levels below the full depth), or None when it sorted no
    depth (every layer count is then untrained)."""
    if run_cfg is None:  # a pretrained / exported model: which exits were trained is unknown
        return None
    grid = build_grid(run_cfg, model)
    depth = next((d for d in grid.dims if d.kind == COUNT), None)
    return None if depth is None else [x for x in depth.levels if x < layers]


def eval_draft(run_dir) -> dict | None:
    """The draft ``sortednet eval`` chose from measurements (``eval/results.json``), if any."""
    if run_dir is None:
        return None
    path = Path(run_dir) / "eval" / "results.json"
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


def choose_draft(cfg, run_dir, trained: list[int] | None, layers: int, console: Console) -> tuple:
    """``(draft exit, k, draft vocabulary or None)``: ``--draft-exit`` if given, else the eval's
    measured choice, else the shallowest trained exit (with a note); ``k`` if given, else the eval's,
    else 4; ``draft_vocab`` (N) if given (0: the full head), else the eval's choice."""
    k, n = cfg.get("k"), cfg.get("draft_vocab")
    if cfg.draft_exit is not None:
        return int(cfg.draft_exit), int(k or 4), draft_vocab(run_dir, n)
    chosen = eval_draft(run_dir)
    if chosen and 1 <= int(chosen["exit"]) < layers:
        n = chosen.get("vocab") if n is None else n
        console.print(f"[dim]draft exit {chosen['exit']}, k={k or chosen['k']}"
                      + (f", head over the {n} most frequent tokens" if n else "")
                      + f": chosen by `sortednet eval` (agreement {chosen['agreement']:.3f}, cost ratio "
                      f"{chosen['cost_ratio']:.2f}, predicted {chosen['speedup']:.2f}x)[/]")
        return int(chosen["exit"]), int(k or chosen["k"]), draft_vocab(run_dir, n)
    if trained:
        console.print(f"[dim]draft exit {min(trained)}: the shallowest exit the run trained (no eval results; "
                      f"`sortednet eval` measures which exit drafts best)[/]")
        return min(trained), int(k or 4), draft_vocab(run_dir, n)
    if run_dir is None:
        draft = max(1, round(0.3 * layers))
        console.print(f"[dim]draft exit {draft} (0.3 x {layers} layers, as the paper's 12 of 40): a model "
                      f"outside a run has no measured or trained exits; --draft-exit E chooses[/]")
        return draft, int(k or 4), draft_vocab(run_dir, n)
    raise UsageError(f"{run_dir} trained no exit below its {layers} layers (dims has no depth levels): give "
                     "--draft-exit E, or train with 'dims=[depth]'")


def _thresholds(cfg, layers: int, trained: list[int] | None) -> dict[int, float]:
    given = cfg.get("thresholds")
    if given is None:
        if trained is not None and not trained:
            raise UsageError("the run trained no exit below the full model: --early-exit needs "
                             "'thresholds={LAYER: P, ...}' or a run trained with 'dims=[depth]'")
        return D.scaled_thresholds(layers, exits=trained)
    try:
        return {int(k): float(v) for k, v in dict(given).items()}
    except (TypeError, ValueError):
        raise UsageError(f"thresholds must map exit layers to probabilities, e.g. "
                         f"'thresholds={{2: 0.9, 4: 0.8}}', got {given!r}") from None


#: key -> (flag, what it must be, integer?, lowest): generate's numbers, from flags (strings) or key=value
NUMBERS = {
    "exit": ("--exit", "a number of layers, e.g. --exit 2", True, 1),
    "draft_exit": ("--draft-exit", "a number of layers, e.g. --draft-exit 2", True, 1),
    "max_tokens": ("--max-tokens", "a number of tokens >= 1, e.g. --max-tokens 64", True, 1),
    "k": ("k", "a draft length >= 1, e.g. k=4", True, 1),
    "draft_vocab": ("draft_vocab", "a number of tokens >= 0 (0: the full head)", True, 0),
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
        if lowest is not None and number < lowest:
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
    if cfg.get("thresholds") is not None and not cfg.early_exit:
        raise UsageError("thresholds are the exits of --early-exit: add --early-exit (or drop thresholds)")
    stack, tokenizer, run_cfg, ckpt, run_dir, model = load_generator(cfg)
    L = stack.num_layers
    trained = trained_exits(run_cfg, model, L)
    template = cfg.template
    instructions = run_cfg is None or run_cfg.data.get("kind") == "instructions"
    if template == "auto":
        if instructions and lm.has_chat_template(tokenizer) and (run_cfg is None or not run_cfg.data.get("raw")):
            template = "chat"
        else:
            template = "alpaca" if run_cfg is not None and instructions else "none"
    if template not in ("chat", "alpaca", "none"):
        raise UsageError(f"template must be auto, chat, alpaca or none, got {template!r}")
    eos = tokenizer.eos_token_id
    if template == "chat":
        if not lm.has_chat_template(tokenizer):
            raise UsageError("template=chat: this tokenizer has no chat template (use template=alpaca or --raw)")
        ids = lm.chat_prompt_ids(tokenizer, str(cfg.prompt))
        eos = lm.end_of_turn(tokenizer)
    else:
        text = lm.alpaca_prompt(str(cfg.prompt)) if template == "alpaca" else str(cfg.prompt)
        ids = tokenizer(text).input_ids
    generator = torch.Generator().manual_seed(int(cfg.seed))
    try:
        sampling = D.Sampling(float(cfg.temperature), float(cfg.top_p), generator)
    except ValueError as e:
        raise UsageError(str(e)) from None

    tokens: list[int] = []
    shown = [""]

    def stream(token: int) -> None:  # decode the whole answer each time: byte-level pieces join up
        tokens.append(token)
        now = tokenizer.decode(tokens, skip_special_tokens=True)
        sys.stdout.write(now[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = now

    max_tokens = fit_context(len(ids), int(cfg.max_tokens), model, console)
    common = dict(max_new_tokens=max_tokens, sampling=sampling, eos=eos, on_token=stream)
    started = time.perf_counter()
    try:
        if cfg.speculative:
            draft, k, vocab = choose_draft(cfg, run_dir, trained, L, console)
            mode = f"self-speculative, draft exit {draft} of {L}" + ("" if vocab is None else f", draft vocab {len(vocab)}")
            out = D.speculative(stack, ids, draft_exit=draft, k=k, draft_vocab=vocab, **common)
        elif cfg.early_exit:
            thresholds = _thresholds(cfg, L, trained)
            mode = f"early exit, thresholds {thresholds}"
            out = D.early_exit(stack, ids, thresholds=thresholds, **common)
        else:
            exit = L if cfg.exit is None else int(cfg.exit)
            mode = f"exit {exit} of {L} layers"
            out = D.generate(stack, ids, exit=exit, **common)
    except ValueError as e:
        raise UsageError(str(e)) from None
    seconds = time.perf_counter() - started
    sys.stdout.write("\n")
    sys.stdout.flush()
    extra = ""
    if out.drafted:
        extra = f"; acceptance {out.acceptance:.2f} ({out.accepted}/{out.drafted} drafts, {out.rounds} rounds)"
    if cfg.speculative and out.greedy_tokens > 2:
        extra += f"; {out.greedy_tokens} tokens decoded greedily (drafting measured slower here)"
    if out.exits:
        extra = "; exits " + ", ".join(f"{k}: {v}" for k, v in sorted(out.exits.items()))
    console.print(f"[dim]{len(out.tokens)} tokens in {seconds:.2f}s ({len(out.tokens) / seconds:.1f} tokens/s), "
                  f"{mode}, {'greedy' if sampling.greedy else f'temperature {sampling.temperature}'}"
                  f"{', stopped at EOS' if out.stopped_at_eos else ''}{extra}; {ckpt}[/]")
    return out
