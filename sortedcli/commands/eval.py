"""``sortednet eval``: the task's metric (accuracy, F1, perplexity), FLOPs, parameters and latency of
each sub-model of a trained run."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import distributed, draft, models
from ..engine import autocast, calibration_batches, evaluate, latency_ms, score, score_members
from ..flops import measure
from ..nest import COUNT, call, has_exits, nesting, run_exits, trunk_groups, use
from ..report import check_out_dir, pareto_front, results_dir, results_table, write_results
from ..errors import UsageError
from ..tasks import move
from .loaded import load_run


def run(cfg: DictConfig, console: Console | None = None) -> list[dict]:
    console = console or Console()
    r = load_run(cfg)
    d = distributed.setup(r.device)  # under torchrun / trainer.devices=N: each rank takes part of the grid
    if d.enabled:
        r.device = distributed.local_device(r.device, d)
        r.model.to(r.device)
    if not d.main:
        console = Console(quiet=True)
    # every path is checked before the work: results that cannot be written, or standalone runs that are
    # not there, are said in one line at once rather than after evaluating the whole grid
    out = check_out_dir(results_dir(r.run_dir, r.ckpt, partial=not cfg.all_submodels), "eval")
    alone_runs = standalone_runs(cfg.standalone, r) if cfg.get("standalone") else None
    subs = r.grid.submodels() if cfg.all_submodels else list(dict.fromkeys([r.grid.smallest, r.grid.largest]))
    mine = subs[d.rank::d.world]
    e, data, task = cfg.eval, r.data, r.data.task
    calib = calibration_batches(r.model, task, data.calib, e.calib_batch_size, e.calib_batches, cfg.seed,
                                r.device, data.collate)
    test = torch.utils.data.DataLoader(data.test, batch_size=e.batch_size, num_workers=cfg.trainer.num_workers,
                                       collate_fn=data.collate)
    held = data.val  # the validation split (see sortedcli.data.validation), or None
    val = None if held is None else torch.utils.data.DataLoader(
        held, batch_size=e.batch_size, num_workers=cfg.trainer.num_workers, collate_fn=data.collate)
    example = move(data.example(), r.device)
    timed = _repeat(example, e.latency.batch_size)
    console.print(f"[bold]sortednet eval[/] {r.run_dir} ({r.ckpt.name}): {len(subs)} of {r.grid.duplicates_note()} "
                  f"on {len(data.test)} test examples ({task.metric}), "
                  + (f"{len(held)} validation examples, " if held is not None else "no validation split, ")
                  + (f"BatchNorm recalibrated on {len(calib)} batches, " if calib else "")
                  + f"device={r.device.type}" + (f", {d.world} processes" if d.enabled else ""))

    rows, metric, higher = [], task.metric, task.higher_is_better
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, disable=not d.main) as bar:
        job = bar.add_task("evaluating", total=len(mine))  # rank 0's share of the grid
        values, checks = {}, {}
        if not calib:  # no BatchNorm to recalibrate per sub-model: exits of one stack share a trunk pass
            for trunk, members in trunk_groups(r.model, mine):
                if len(members) > 1:
                    bar.update(job, description=f"evaluating {len(members)} exits of {trunk.name} in one pass")
                    values.update(score_members(r.model, task, trunk, members, test, r.device, r.amp))
                    if val is not None:
                        checks.update(score_members(r.model, task, trunk, members, val, r.device, r.amp))
        for sub in mine:
            bar.update(job, description=f"evaluating {sub.name}")
            cost = measure(r.model, sub, example)
            value = values[sub] if sub in values else evaluate(r.model, task, sub, calib, test, r.device, r.amp)
            checked = None if val is None else checks[sub] if sub in checks else \
                score(r.model, task, sub, val, r.device, r.amp)  # same calibration
            with torch.no_grad(), use(r.model, sub), autocast(r.device, r.amp):
                ms = latency_ms(lambda: call(r.model, timed), r.device, e.latency.warmup, e.latency.reps)
            rows.append({"name": sub.name, "dims": sub.as_dict(), metric: value,
                         **({} if val is None else {f"val_{metric}": checked}), "flops": cost.flops,
                         "params": cost.params, "latency_ms": ms, "full": sub == r.grid.largest})
            bar.advance(job)
    if d.enabled:  # one table, in the grid's order, as a single process would make it
        parts = d.gather(rows)
        rows = [row for i in range(len(subs)) for row in [parts[i % d.world][i // d.world]]]
        if not d.main:
            return rows
    seconds = time.perf_counter() - started

    full = next((row[metric] for row in rows if row["full"]), None)
    if full is None:
        full = (max if higher else min)(row[metric] for row in rows)
    for row in rows:  # relative to the full model: higher is better either way (perplexity: full / sub)
        row[f"rel_{metric}"] = (100.0 * row[metric] / full if higher else 100.0 * full / row[metric]) \
            if full and row[metric] else None
    if alone_runs is not None:
        alone = standalone_scores(alone_runs, r, calib, test, console)
        for row in rows:
            value = alone.get(row["name"])
            row["standalone"] = value
            row["rel_standalone"] = None if not value or not row[metric] else \
                (100.0 * row[metric] / value if higher else 100.0 * value / row[metric])
    for row, on_front in zip(rows, pareto_front(rows, metric, higher)):
        row["pareto"] = on_front
    chosen = None
    if models.entry(r.cfg.model.name).can_generate and has_exits(r.model) and e.get("exits", True):
        chosen = measure_exits(r, rows, test, e, console)
    title = f"{r.cfg.model.name} on {data.name}: {len(rows)} sub-models, FLOPs per {data.unit}"
    console.print(results_table(rows, metric, title=title, higher_is_better=higher))
    # The whole grid goes to eval/ (what export chooses from); a partial evaluation never replaces it, nor
    # do the results of a checkpoint other than the latest (they go to eval/<its folder>/: see results_dir)
    measured = {"test_items": len(data.test), "val_items": None if held is None else len(held),
                "calib_batches": len(calib), "calib_items": sum(_items(batch) for batch in calib),
                "calib_batch_size": int(e.calib_batch_size), "seed": int(cfg.seed), "device": r.device.type,
                "precision": "fp32" if r.amp is None else str(r.amp).removeprefix("torch."),
                "latency": {"batch_size": int(e.latency.batch_size), "warmup": int(e.latency.warmup),
                            "reps": int(e.latency.reps)}, "processes": d.world}
    paths = write_results(rows, out, metric, higher, title=title, checkpoint=r.record, draft=chosen,
                          measured=measured)
    worst = (min if higher else max)(rows, key=lambda row: row[metric])
    rel = worst[f"rel_{metric}"]
    relative = f" = {rel:.1f}% of full" if rel is not None else ""
    console.print(f"full model {metric} {full:.2f}; weakest sub-model {worst['name']} {worst[metric]:.2f}{relative} "
                  f"(test set). FLOPs = 2 x multiply-adds per {data.unit}.")
    if val is None:
        console.print("no validation split (data.val_fraction=0, or a run made before it): `sortednet export` "
                      "will choose on the test set")
    else:
        key = f"val_{metric}"
        full_val = next((f"full model {row[key]:.2f}, " for row in rows if row["full"]), "")
        best = (max if higher else min)(rows, key=lambda row: row[key])
        console.print(f"validation {metric} ({len(held)} held-out training examples; `sortednet export` chooses "
                      f"on these): {full_val}best {best['name']} {best[key]:.2f}")
    vs_alone = [row for row in rows if row.get("rel_standalone") is not None]
    if vs_alone:
        low = min(vs_alone, key=lambda row: row["rel_standalone"])
        console.print(f"vs trained alone ({len(vs_alone)} sub-models): lowest {low['name']} "
                      f"{low[metric]:.2f} = {low['rel_standalone']:.1f}% of its standalone {low['standalone']:.2f}")
    console.print(f"evaluated {len(rows)} sub-models in {seconds:.1f}s"
                  + (f" ({d.world} processes)" if d.enabled else ""))
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    if results_dir(r.run_dir, r.ckpt) != r.run_dir / "eval":
        console.print(f"{r.ckpt.name} is not the run's latest checkpoint: its results went to {out}/, "
                      f"beside the latest's in {r.run_dir / 'eval'}/ (export --ckpt {r.ckpt} reads them)")
    return rows


def _items(batch) -> int:
    """How many examples a calibration batch (a tensor, or a dict / tuple of them) holds."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()))
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    return int(batch.shape[0])


def measure_exits(r, rows: list[dict], test, e, console: Console) -> dict | None:
    """Per trained exit of a causal LM (the depth levels, other dims at full size): agreement with the
    full model on the held-out data, measured cost ratio of a decoding step, the best predicted
    self-speculative speed-up and its k (:mod:`sortedcli.draft`), written into the rows of those
    exits; three greedy samples per exit beside the full model's. Returns the chosen draft."""
    depth = next((d for d in r.grid.dims if d.kind == COUNT), None)
    if depth is None:
        return None
    L = nesting(r.model).depth
    exits = [x for x in depth.levels if x < L]
    stack = models.entry(r.cfg.model.name).stack(r.model)
    V = int(stack.head(stack.embed(torch.zeros(1, 1, dtype=torch.long, device=r.device))).shape[-1])
    with console.status("ranking the training data's tokens by frequency"):
        ranks = draft.token_ranks((item["input_ids"] for item in r.data.train), V)
    save_ranks(ranks, r.run_dir / "eval" / "token-ranks.safetensors")
    vocabs = {n: ranks[:n] for n in draft.VOCAB_SIZES if n < V}
    with console.status(f"measuring {len(exits)} exits: agreement with the full model, cost of a step"):
        a = draft.agreement(r.model, r.data.task, exits, test, r.device, r.amp, vocabs)
        c = draft.cost_ratios(stack, exits, e.latency.warmup, e.latency.reps, vocabs)
        v = draft.verify_ratios(stack)
    full_dims = {d.name: d.largest for d in r.grid.dims if d.kind != COUNT}
    full_flops = next((row["flops"] for row in rows if row["full"]), None)
    ratios = {row["dims"][depth.name]: row["flops"] / full_flops for row in rows if full_flops
              and row["dims"].get(depth.name) in exits and all(row["dims"].get(k) == x for k, x in full_dims.items())}
    c, unreliable = checked_costs(c, ratios)
    if unreliable:  # a busy machine's timings predicted a 22.71x speed-up from an exit costing 0.02x
        console.print(f"[yellow]{unreliable}[/]", soft_wrap=True)
        a = {key: x for key, x in a.items() if key in c}
        vocabs = {}
    # the draft's acceptance is predicted on the text it meets while decoding: the full model's own
    # greedy answers (eval's held-out answers are someone else's text: SmolLM2's exit 3 agreed on 0.37 of
    # GSM8K's and 0.23 of its drafts); `agreement` stays the held-out answers' for comparison
    own_prompts = [sample_prompt(r.data.test[i]) for i in range(min(draft.OWN_TEXT_PROMPTS, len(r.data.test)))]
    own = {}
    if own_prompts and "input_ids" in r.data.test[0]:
        with console.status(f"measuring {len(exits)} exits' agreement on the full model's own answers "
                            f"({len(own_prompts)} held-out prompts x {draft.OWN_TEXT_TOKENS} tokens)"):
            own = draft.own_text_agreement(r.model, stack, r.data.task, own_prompts, exits, r.device, r.amp,
                                           {n: vocabs[n] for n in vocabs})
        own = {key: x for key, x in own.items() if key in a}
        console.print("top-1 agreement on the full model's own answers (what drafts meet): "
                      + ", ".join(f"exit {x} {own[x, None]:.3f}" for x in exits if (x, None) in own))
    basis = own or a
    console.print("verifying T tokens costs " + ", ".join(f"{t}: {x:.2f}x" for t, x in v.items() if t > 1)
                  + " one token's step here; the predicted speed-ups include it")
    for row in rows:
        x = row["dims"].get(depth.name)
        if (x, None) in a and all(row["dims"].get(k) == v for k, v in full_dims.items()):
            k, s = draft.best_k(basis[x, None], c[x, None], verify=v)
            row.update(agreement=a[x, None], cost_ratio=c[x, None], speedup=s, best_k=k)
            if own:
                row["agreement_own_text"] = own[x, None]
            for n in vocabs:
                row[f"vocab{n}"] = {"agreement": a[x, n], "cost_ratio": c[x, n],
                                    "speedup": draft.best_k(basis[x, n], c[x, n], verify=v)[1]}
                if own:
                    row[f"vocab{n}"]["agreement_own_text"] = own[x, n]
    base = untouched_model(r)
    if base is not None:  # the run's starting weights: how far training moved each exit and the full model
        with console.status(f"measuring {len(exits) + 1} exits' agreement with the untouched model ({base[1]})"):
            u = untouched_agreement(r, base[0], [*exits, L], test)
        del base
        for row in rows:
            x = row["dims"].get(depth.name)
            if x in u and all(row["dims"].get(k) == v for k, v in full_dims.items()):
                row["agreement_initial"] = u[x]
        console.print(f"top-1 agreement with the untouched model (the run's starting weights): full model {u[L]:.3f}, "
                      + ", ".join(f"exit {x} {u[x]:.3f}" for x in exits))
    chosen = draft.choose(basis, c, L, verify=v)
    if chosen is not None:
        if own:  # its `agreement` is the own-text one it was chosen on
            chosen["agreement_on"] = "the full model's own answers"
            chosen["agreement_reference"] = a[chosen["exit"], chosen["vocab"]]
        chosen["verify"] = {str(t): x for t, x in v.items()}
        chosen["cost_from"] = "flops" if unreliable else "timed"
        n = int(e.get("samples", 3))
        prompts = [sample_prompt(r.data.test[i]) for i in range(min(n, len(r.data.test)))]
        out = draft.samples(stack, prompts, [*exits, L], int(e.get("sample_tokens", 16))) if prompts else {}
        tok = r.tokenizer
        chosen["samples"] = {str(x): [tok.decode(p + t, skip_special_tokens=True) for p, t in zip(prompts, ts)]
                             for x, ts in out.items()}
        vocab = "full head" if chosen["vocab"] is None else f"head over the {chosen['vocab']} most frequent tokens"
        console.print(f"draft for --speculative: exit {chosen['exit']} of {L}, {vocab}, k={chosen['k']}: agreement "
                      f"{chosen['agreement']:.3f}, cost ratio {chosen['cost_ratio']:.2f}, predicted speed-up "
                      f"{chosen['speedup']:.2f}x (with verifying {chosen['k'] + 1} tokens at "
                      f"{draft.verify_cost(v, chosen['k'] + 1):.2f}x a step)")
        for x in (chosen["exit"], L) if prompts else ():  # eval.samples=0: none written
            console.print(f"  exit {x}: {chosen['samples'][str(x)][0]!r}")
    return chosen


def untouched_model(r) -> tuple[torch.nn.Module, str] | None:
    """``(the run's starting model, where it came from)``, ready for inference on the run's device: the
    weights a run whose teacher was the starting model kept (``RUN/pretrained/initial.safetensors``), else
    those of ``model.pretrained`` while it is still a local folder or file, or, for a hub id, the commit the
    run started from while the Hugging Face cache holds it (never the hub's newer ``main``); None for a
    random init, or when neither is there any more."""
    from pathlib import Path

    from omegaconf import OmegaConf
    from safetensors.torch import load_model

    from .. import runs
    from ..build import build_model, initial_weights, plain
    from ..models.hf import hub_folder, is_snapshot, snapshot_mark

    path = initial_weights(r.run_dir)
    if path.is_file():
        source = runs.self_contained(r.cfg, r.run_dir)
        model = build_model(OmegaConf.create({"model": models.architecture(plain(source.model))[0]}),
                            r.data.model_args)
        load_model(model, str(path))
        where = str(path)
    else:
        pretrained = r.cfg.model.get("pretrained")
        local = Path(str(pretrained)).expanduser() if pretrained else None
        if local is None or (local.exists() and is_snapshot(local)):
            return None
        where, cfg = f"model.pretrained={pretrained}", r.cfg
        if not local.exists():  # a hub id: the commit the run started from, from the Hugging Face cache only
            revision = snapshot_mark(r.run_dir / runs.PRETRAINED_DIR).get("revision")
            folder = hub_folder(str(pretrained), revision) if revision else None
            if folder is None:  # a moved folder, a run from before revisions were kept, a cleared cache
                return None
            cfg = OmegaConf.merge(r.cfg, {"model": {"pretrained": str(folder)}})
            where += f" at {revision[:12]}"
        try:
            model = build_model(cfg, r.data.model_args)
        except UsageError:  # the cache's files no longer load
            return None
    return models.entry(r.cfg.model.name).for_inference(model).to(r.device).eval(), where


@torch.no_grad()
def untouched_agreement(r, base: torch.nn.Module, depths: list[int], test) -> dict[int, float]:
    """``{exit: fraction of the counted held-out positions where the run's exit (the deepest: its full
    model) predicts the token that ``base``, the untouched model, predicts}``: one trunk pass of each per
    batch, read out at the counted positions only."""
    task, full = r.data.task, nesting(base).depth
    sums = {x: torch.zeros(2) for x in depths}
    with autocast(r.device, r.amp):
        for batch in test:
            batch = task.to_device(batch, r.device)
            inputs, at = task.inputs(batch), task.keep(batch)
            with use(base, None):
                want = run_exits(base, inputs, [full], at=at)[full]
            with use(r.model, None):
                got = run_exits(r.model, inputs, depths, at=at)
            for x in depths:
                if at is None:  # every position's logits: the task says which count
                    sums[x] += task.agreement(got[x], want, batch).float().cpu()
                else:  # gathered at the counted positions: all of them count
                    sums[x] += torch.tensor([float((got[x].argmax(-1) == want.argmax(-1)).sum()), float(len(want))])
    return {x: float(s[0] / s[1]) if s[1] else float("nan") for x, s in sums.items()}


def checked_costs(c: dict, flops: dict, low: float = 0.25, high: float = 4.0) -> tuple[dict, str | None]:
    """The timed cost ratios ``c`` (``{(exit, N): step time / the full model's}``, N None for the full
    head) when each full-head one lies within ``[low, high]`` x that exit's FLOPs ratio (``{exit: FLOPs /
    the full model's}``); else the timing is unreliable (a busy machine, a coarse timer): the FLOPs
    ratios instead, full head only (the restricted heads were timed alike), and a line saying so."""
    bad = [(x, c[x, None], f) for x, f in sorted(flops.items())
           if (x, None) in c and f > 0 and not low * f <= c[x, None] <= high * f]
    if not bad:
        return c, None
    x, timed, f = bad[0]
    more = f" and {len(bad) - 1} other exit{'s' * (len(bad) > 2)}" if len(bad) > 1 else ""
    return {(e, None): f for e, f in flops.items()}, (
        f"the timed cost of a decoding step is unreliable (exit {x}: {timed:.2f}x the full model's, where its "
        f"FLOPs are {f:.2f}x{more}; a busy machine?): the predicted speed-ups use the FLOPs ratios and the full "
        "head instead; re-run eval on a quiet machine to time them")


def sample_prompt(item: dict, plain: int = 8) -> list[int]:
    """What a sample continues: an instruction example's prompt (every token before the first one
    that counts: the question, in the chat template with the assistant's turn opened), else the
    first ``plain`` tokens of the text."""
    ids = [int(t) for t in item["input_ids"]]
    labels = item.get("labels")
    if labels is not None:
        first = next((i for i, lab in enumerate(map(int, labels)) if lab != -100), None)
        if first:
            return ids[:first]
    return ids[:plain]


def save_ranks(ranks: torch.Tensor, path) -> None:
    """The token ranking as safetensors (``ids``), written atomically."""
    import os
    import tempfile

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({"ids": ranks.contiguous()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def standalone_runs(folder, r) -> list:
    """``[(run folder, its latest checkpoint)]`` of the sub-models trained alone under
    ``folder/standalone/<name>/`` (by ``sortednet train ... standalone=[...]``), checked before any
    work: none there, one without a checkpoint, or one of another model or other data is refused."""
    from pathlib import Path

    from .. import runs
    from ..build import plain

    root = Path(folder)
    found = sorted(p for p in (root / "standalone").glob("*") if (p / "config.yaml").is_file()) \
        if (root / "standalone").is_dir() else []
    if not found:
        raise UsageError(f"standalone={folder}: no {root / 'standalone'}/<name>/ runs there; make them with "
                         "`sortednet train ... 'standalone=[NAME,...]' hydra.run.dir=DIR`")
    out = []
    for run_dir in found:
        ckpt = runs.latest_checkpoint(run_dir)
        if ckpt is None:
            raise UsageError(f"standalone: {run_dir} has no checkpoint (its training did not finish: "
                             f"--resume {run_dir})")
        cfg = runs.load_config(run_dir)
        for key in ("model", "data"):
            if plain(cfg.get(key) or {}) != plain(r.cfg[key]):
                raise UsageError(f"standalone: {run_dir} was trained with another {key} than {r.run_dir} "
                                 f"({plain(cfg.get(key) or {})} vs {plain(r.cfg[key])})")
        out.append((run_dir, ckpt))
    return out


def standalone_scores(found: list, r, calib: list, test, console: Console) -> dict[str, float]:
    """``{name: metric}`` of each sub-model trained alone (``found``: :func:`standalone_runs`),
    evaluated here with the sorted run's calibration and test examples; runs of another model or
    other data are refused."""
    from omegaconf import OmegaConf

    from .. import runs
    from ..build import build_grid, build_model, plain

    out = {}
    for run_dir, ckpt in found:
        weights, cfg = runs.load_weights(ckpt)
        for key in ("model", "data"):
            if plain(cfg[key]) != plain(r.cfg[key]):
                raise UsageError(f"standalone: {run_dir} was trained with another {key} than {r.run_dir} "
                                 f"({plain(cfg[key])} vs {plain(r.cfg[key])})")
        # the architecture alone: the checkpoint overwrites every weight (model.weights may have moved)
        arch = OmegaConf.create({"model": models.architecture(plain(cfg.model))[0]})
        model = build_model(arch, r.data.model_args)
        model.load_state_dict(weights)
        model.to(r.device)
        sub = build_grid(cfg, model).largest
        out[sub.name] = evaluate(model, r.data.task, sub, calib, test, r.device, r.amp)
        console.print(f"standalone {sub.name}: {r.data.task.metric} {out[sub.name]:.2f}")
    return out


def _repeat(example, n: int):
    """``example`` (a batch of one) repeated to a batch of ``n``."""
    if isinstance(example, dict):
        return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in example.items()}
    return example.expand(n, *example.shape[1:]).contiguous()
