"""Issue 21's study: ways of training SmolLM2-135M-Instruct's exits, each given the same training time.

Usage::

    .venv/bin/python benchmarks/smollm2_study.py [--minutes 30] [--runs runs/smollm2-study]
        [--arms sft,soft_all,...] [--out docs/results/smollm2/study] [--decode] [--set KEY=VALUE ...]

``make smollm2-study`` runs it as published (``STUDY_MINUTES=30``, ``--out docs/results/smollm2/study-30min``,
the shortened ``--eval-set`` of ``STUDY_EVAL``). Every arm is ``sortednet train`` of a recipe with
``trainer.max_minutes=M`` (training time, added up over resumes) and no step limit, then ``sortednet eval
--all-submodels``; the untouched model is measured the same way from its step-0 checkpoint. It is
resumable: a run that exists is resumed (``nothing to train`` once its minutes are spent), an eval
that measured the run's newest checkpoint is kept, so an interrupted study is started again with the
same command; ``--set`` overrides go to every ``train`` (the tests shrink the recipes with them), ``--eval-set``
to every ``eval`` (a shorter evaluation, the same for every arm). After
each arm the report is written again (``--out``), with the arms that an earlier run wrote there and
this one did not choose kept as they were (the study can run an arm or two at a time):

- ``table.md``: per arm, its steps and minutes, the machine's load while it trained, the full model's
  perplexity and top-1 agreement with the untouched model; per exit, perplexity, agreement a with the
  run's own full model (a greedy draft's acceptance), with the untouched model, the measured cost c of
  a decoding step at that exit and eval's predicted speed-up; then eval's samples side by side;
- ``study.json``: the same numbers, per arm.

``--decode`` (``make smollm2-study`` passes it) also measures each arm's decoding: its full model is
written as a plain transformers folder (:func:`full_model`) and ``benchmarks/decoding.py`` runs on it (3 held-out
prompts, 32 new tokens, one repetition): greedy, self-speculative from eval's draft exit (full head
and the 8192-token draft head), and early exit with thresholds chosen for +5% perplexity on 8 held-out
answers; the table gives the best measured speculative ratio over greedy with its acceptance a, and
early exit's ratio with its measured perplexity increase.

Equal wall time is fair only on a quiet machine: the load average is recorded for each arm so that a
reader can tell. The learning-rate schedule is each recipe's own (cosine over one epoch), cut where the
minutes end, the same for every arm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NO_LIMIT = ["trainer.max_steps=null", "trainer.ckpt_every=10"]

#: arm -> (title, recipe, overrides). SoFT trains every exit from one trunk pass; "sampled" the full
#: model and 3 exits drawn per step (smollm2_soft's default since the pilot; the other arms name
#: sampler=all, as the pilot ran them); distillation adds KL(full || exit) (the same step's full model,
#: detached) beside each exit's cross-entropy; "distill only" teaches the exits the untouched model's
#: distributions alone and anchors the full model to it; "anchored" is the same with the full model's
#: cross-entropy off (``distill.anchor_only``): no sub-model learns from the reference answers; "anchored
#: heavy" weighs the anchor 10, as much as the other nine sub-models' losses together; "anchored slow" is that
#: at lr 1e-5 (AdamW's steps are about lr in size whatever the loss's scale: does a smaller step let the anchor
#: hold the full model?).
ARMS = {
    "sft": ("SFT (full model only)", "smollm2_sft", []),
    "soft_all": ("SoFT, all 10 exits", "smollm2_soft", ["sampler=all"]),
    "soft_sampled": ("SoFT, full + 3 sampled exits", "smollm2_soft", ["sampler=sortednet_g3_largest"]),
    "soft_distill": ("SoFT + self-distillation", "smollm2_soft",
                     ["sampler=all", "distill.enabled=true", "distill.teacher=self", "distill.alpha=0.5"]),
    "distill_only": ("distillation only (frozen teacher, anchored full)", "smollm2_soft",
                     ["sampler=all", "distill.enabled=true", "distill.teacher=initial", "distill.alpha=1.0",
                      "distill.anchor=1.0"]),
    "anchored": ("distillation only, full model on the anchor alone (no labels)", "smollm2_soft",
                 ["sampler=all", "distill.enabled=true", "distill.teacher=initial", "distill.alpha=1.0",
                  "distill.anchor=1.0", "distill.anchor_only=true"]),
    "anchored_heavy": ("the same, anchor 10 (as heavy as the exits together)", "smollm2_soft",
                       ["sampler=all", "distill.enabled=true", "distill.teacher=initial", "distill.alpha=1.0",
                        "distill.anchor=10.0", "distill.anchor_only=true"]),
    "anchored_slow": ("the same at a fifth of the learning rate (1e-5)", "smollm2_soft",
                      ["sampler=all", "distill.enabled=true", "distill.teacher=initial", "distill.alpha=1.0",
                       "distill.anchor=10.0", "distill.anchor_only=true", "optim.lr=1e-5"]),
    "soft_self": ("SoFT on the model's own answers", "smollm2_soft_self", ["sampler=all"]),
    "exit_readouts": ("the untouched model's exits with their own affine readouts, trunk frozen, self-distilled",
                      "smollm2_soft", ["sampler=all", "model.exits.readout=affine", "model.exits.trunk=frozen",
                                       "distill.enabled=true", "distill.teacher=self", "distill.alpha=1.0",
                                       "optim.lr=1e-3"]),
    # exit_readouts trained on the text it drafts: the untouched model's own greedy answers (data.answers=self;
    # 900 GSM8K training questions, 810 trained on, two epochs allowed so that the time budget binds: the
    # own answers are ~1.6x longer than GSM8K's, so a step costs more)
    "self_readouts": ("exit_readouts on the model's own answers", "smollm2_soft_self",
                      ["sampler=all", "model.exits.readout=affine", "model.exits.trunk=frozen",
                       "distill.enabled=true", "distill.teacher=self", "distill.alpha=1.0", "optim.lr=1e-3",
                       "data.train_subset=900", "trainer.epochs=2"]),
    # two stages: soft_all's model (its newest checkpoint, as the plain folder of its full model) with its
    # exits' own readouts trained on top, trunk frozen; its a0 is measured against soft_all's model, which
    # is its starting model (soft_all's own a0 is the one against SmolLM2)
    "soft_then_readouts": ("soft_all's model, then its exits' own affine readouts, trunk frozen", "smollm2_soft",
                           ["model.pretrained={runs}/soft_all/full-model", "sampler=all", "model.exits.readout=affine",
                            "model.exits.trunk=frozen", "distill.enabled=true", "distill.teacher=self",
                            "distill.alpha=1.0", "optim.lr=1e-3"]),
}
UNTOUCHED = ("untouched", "smollm2_soft", ["trainer.max_steps=0"])


def sortednet(*args) -> None:
    cmd = [sys.executable, "-m", "sortedcli.cli", *map(str, args)]
    print("$ sortednet " + " ".join(map(str, args)), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")


def latest(run: Path) -> Path | None:
    pointer = run / "checkpoints" / "latest"
    return run / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def train(run: Path, recipe: str, overrides: list[str], minutes: float | None, extra: list[str]) -> dict:
    """Train (or resume) one arm; ``{"load": [1-min load averages before and after]}``."""
    before = os.getloadavg()[0]
    budget = [] if minutes is None else [f"trainer.max_minutes={minutes:g}", *NO_LIMIT]
    if latest(run) is None:
        sortednet("train", "--recipe", recipe, *overrides, *budget, *extra, f"hydra.run.dir={run}")
    elif minutes is not None:
        sortednet("train", "--resume", run, *budget)
    return {"load": [round(before, 2), round(os.getloadavg()[0], 2)]}


def evaluate(run: Path, extra: list[str]) -> dict:
    """eval --all-submodels of the run's newest checkpoint, unless its results already measured it."""
    results = run / "eval" / "results.json"
    ckpt = latest(run)
    if not results.is_file() or json.loads(results.read_text()).get("checkpoint", {}).get("path", "") \
            != str(ckpt.relative_to(run)):
        sortednet("eval", "--all-submodels", "--ckpt", run, *extra)
    return json.loads(results.read_text())


def progress(run: Path) -> dict:
    import torch

    state = torch.load(latest(run) / "state.pt", map_location="cpu", weights_only=True)
    return {"steps": state["progress"]["step"], "minutes": round(state["progress"].get("seconds", 0.0) / 60, 4)}


#: the measured decoding (``--decode``): few prompts and tokens, one repetition (a 135M model on 2 cores)
DECODE = ["--prompts", "3", "--new-tokens", "32", "--reps", "1", "--ppl-items", "8", "--no-ppl",
          "--max-ppl-increase", "0.05"]


def decode(run: Path, draft: dict, measure: bool = True) -> dict | None:
    """Measured decoding of the run's newest checkpoint (``benchmarks/decoding.py`` on its full model,
    as a plain folder (:func:`full_model`): greedy, self-speculative from eval's draft exit, early exit with
    thresholds chosen for +5% perplexity; eval's predicted speed-up passed on as ``generate`` does),
    kept in ``run/decoding.json`` until a newer checkpoint.
    Without ``measure``, only what is kept (None if nothing is, or it measured an older checkpoint)."""
    out = run / "decoding.json"
    ckpt = latest(run).name
    if out.is_file() and json.loads(out.read_text()).get("checkpoint") == ckpt:
        return json.loads(out.read_text())
    if not measure:
        return None
    # a run whose exits read out through their own modules (model.exits) is decoded as the run itself: a
    # plain folder of its full model would read every exit through the shared norm
    own = ((_config(run).get("model") or {}).get("exits") or {}).get("readout", "shared") != "shared"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decoding.py"), "--model", str(run if own else full_model(run)),
           "--out", str(out), *DECODE, *(["--draft-exits", str(draft["exit"])] if draft.get("exit") else []),
           *(["--k", str(draft["k"])] if draft.get("k") else []),  # eval's k, as generate drafts
           *(["--expected", str(draft["speedup"])] if draft.get("speedup") else [])]
    print("$ " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    doc = json.loads(out.read_text())
    doc["checkpoint"] = ckpt
    out.write_text(json.dumps(doc, indent=1))
    return doc


def _config(run: Path) -> dict:
    """The run's resolved config (``run/config.yaml``)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))


def full_model(run: Path) -> Path:
    """The run's newest full model as a plain transformers folder, ``run/full-model/``: the pretrained
    model's config and tokenizer files (``run/pretrained/``) beside a link to the checkpoint's
    ``model.safetensors`` (transformers' own key names; a tied head is tied again on loading). Not
    ``sortednet export --budget 1``, which writes the best sub-model within the budget, not
    necessarily the full one."""
    folder = run / "full-model"
    folder.mkdir(exist_ok=True)
    from sortedcli.models.hf import SNAPSHOT_MARK

    (folder / SNAPSHOT_MARK).unlink(missing_ok=True)  # a folder with its weights, not a run's copy of a config
    for f in (run / "pretrained").iterdir():
        if f.is_file() and f.suffix in (".json", ".jinja", ".txt", ".model") and f.name != SNAPSHOT_MARK:
            (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    weights.unlink(missing_ok=True)
    weights.symlink_to((latest(run) / "model.safetensors").resolve())
    return folder


def measured(doc: dict) -> dict:
    """From a decoding result: the best self-speculative ratio over greedy (with its a, c and the draft
    head it used), and early exit with thresholds chosen for +5% perplexity (ratio, perplexity increase,
    share of layer passes)."""
    methods = doc["methods"]
    spec = [(name, m) for name, m in methods.items() if name.startswith("speculative")]
    name, best = max(spec, key=lambda x: x[1]["ratio_vs_greedy_ours"]) if spec else (None, {})
    chosen = next((m for n, m in methods.items() if n.startswith("early exit, chosen")), {})
    increase = chosen["ppl_early_exit"] / chosen["ppl_full"] - 1 if chosen.get("ppl_full") else None
    a = best.get("a")
    a = None if a is None or math.isnan(a) else a  # nothing drafted: every token was decoded greedily
    return {"speculative": best.get("ratio_vs_greedy_ours"), "speculative_method": name, "a": a,
            "c": best.get("c"), "identical": best.get("identical"), "prompts": doc.get("prompts"),
            "early_exit": chosen.get("ratio_vs_greedy_ours"), "early_exit_ppl_increase": increase,
            "early_exit_thresholds": chosen.get("chosen_thresholds"),
            "early_exit_layers": chosen.get("layers_used"),
            "verify_ratio": {T: ms / doc["verify_ms"]["1"] for T, ms in doc.get("verify_ms", {}).items()}}


def summary(doc: dict) -> dict:
    """The study's numbers of one eval: the full model and each exit."""
    rows = doc["rows"]
    metric = doc.get("metric", "perplexity")
    full = next(r for r in rows if r.get("full"))
    exits = {}
    for r in rows:
        depth = r["dims"].get("depth")
        if depth is None or r.get("full"):
            continue
        exits[str(depth)] = {k: r.get(k) for k in (metric, "agreement", "agreement_own_text", "agreement_initial",
                                                   "cost_ratio", "speedup")}
    draft = doc.get("draft") or {}
    return {"full": {metric: full.get(metric), "agreement_initial": full.get("agreement_initial")}, "exits": exits,
            "metric": metric, "draft": {k: draft.get(k) for k in ("exit", "k", "vocab", "agreement", "speedup")},
            "samples": draft.get("samples") or {}}


def report(arms: dict, out: Path, minutes: float | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"minutes": minutes, "arms": arms}, indent=1))
    lines = [f"# SmolLM2-135M-Instruct: exits trained {minutes:g} minutes each\n" if minutes else "",
             "Written by `benchmarks/smollm2_study.py` (`make smollm2-study`); ppl: held-out perplexity, "
             "a: top-1 agreement with the run's own full model (a greedy draft's acceptance), a0: with the "
             "untouched model, c: a decoding step at the exit over the full model's, speed-up: eval's "
             "prediction for self-speculative decoding from that exit.\n",
             "| arm | steps | minutes | load (start, end) | full ppl | full a0 | draft (exit, k) | predicted speed-up "
             "| measured speculative | early exit at +5% ppl (speed-up, ppl increase) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in arms.items():
        s, d, dec = arm["summary"], arm["summary"]["draft"], arm.get("decoding") or {}
        m = s["metric"]
        early = (f"{_f(dec['early_exit'])}x, +{100 * dec['early_exit_ppl_increase']:.1f}%"
                 if dec.get("early_exit") is not None and dec.get("early_exit_ppl_increase") is not None else "-")
        lines.append(f"| {arm['title']} | {arm.get('steps', 0)} | {arm.get('minutes', 0)} | {arm.get('load', '')} | "
                     f"{_f(s['full'][m])} | {_f(s['full']['agreement_initial'])} | "
                     f"{(d.get('exit'), d.get('k')) if d.get('exit') else '-'} | {_f(d.get('speedup'))} | "
                     f"{_f(dec.get('speculative'))}{' (a ' + _f(dec['a']) + ')' if dec.get('a') is not None else ''} | "
                     f"{early} |")
    depths = sorted({int(x) for arm in arms.values() for x in arm["summary"]["exits"]})
    for what, key in (("perplexity", None), ("a (own full model, on the held-out reference answers)", "agreement"),
                      ("a on the full model's own answers (what drafts meet; eval predicts on it)",
                       "agreement_own_text"),
                      ("a0 (untouched model)", "agreement_initial"), ("predicted speed-up", "speedup")):
        lines += ["", f"## Per exit: {what}\n", "| arm | " + " | ".join(f"exit {x}" for x in depths) + " |",
                  "|---|" + "---|" * len(depths)]
        for arm in arms.values():
            s = arm["summary"]
            k = key or s["metric"]
            lines.append(f"| {arm['title']} | " + " | ".join(_f(s["exits"].get(str(x), {}).get(k)) for x in depths)
                         + " |")
    lines += ["", "## Samples (the first held-out question, every exit)\n"]
    for arm in arms.values():
        samples = arm["summary"]["samples"]
        if samples:
            lines.append(f"**{arm['title']}**\n")
            lines += [f"- exit {x}: `{' '.join(str(texts[0]).split())[-160:]}`" for x, texts in samples.items()]
            lines.append("")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def _f(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) >= 1000 else f"{x:.3f}"
    return "-" if x is None else str(x)


def _with_earlier(done: dict, earlier: dict) -> dict:
    """The arms measured now, and those of an earlier run of the study into the same ``--out`` that this
    one did not choose (their numbers as they were written), in the study's order: running the arms
    one or two at a time still writes one table of all of them."""
    order = ["untouched", *ARMS]
    kept = {k: v for k, v in earlier.items() if k not in done and k in order}
    both = {**kept, **done}
    return {k: both[k] for k in order if k in both}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="training time of every arm (default 30)")
    ap.add_argument("--runs", default="runs/smollm2-study")
    ap.add_argument("--arms", default=",".join(a for a in ARMS if a != "anchored_slow"),
                    help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--out", default="docs/results/smollm2/study")
    ap.add_argument("--decode", action="store_true",
                    help="also measure decoding per arm (benchmarks/decoding.py on the run's full model: "
                         "speculative from eval's draft exit, early exit chosen for +5%% perplexity); "
                         "without it, measurements kept from an earlier --decode still go into the table")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every train")
    ap.add_argument("--eval-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every eval (e.g. eval.test_subset=32: the same for every arm)")
    args = ap.parse_args(argv)
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm {unknown[0]!r}: choose among {', '.join(ARMS)}")
    runs, out = (ROOT / args.runs).resolve(), (ROOT / args.out).resolve()
    done = {}
    earlier = json.loads((out / "study.json").read_text())["arms"] if (out / "study.json").is_file() else {}
    for name, (title, recipe, overrides) in [("untouched", UNTOUCHED), *((a, ARMS[a]) for a in chosen)]:
        run = runs / name
        started = time.time()
        before = progress(run) if latest(run) is not None else None
        placed = [o.replace("{runs}", str(runs)) for o in overrides]  # (the record keeps "{runs}")
        for source in {o.split("{runs}/")[1].split("/")[0] for o in overrides if "{runs}/" in o}:
            if latest(runs / source) is None:
                raise SystemExit(f"arm {name} starts from the {source} arm's model: run --arms {source} first")
            full_model(runs / source)  # its newest checkpoint, as a plain folder
        info = train(run, recipe, placed, None if name == "untouched" else args.minutes, args.set)
        info.update(progress(run), title=title, recipe=recipe, overrides=overrides)
        if before == progress(run) and name in earlier:  # nothing trained now: the load it trained at
            info["load"] = earlier[name].get("load", info["load"])
        info["summary"] = summary(evaluate(run, args.eval_set))
        kept = decode(run, info["summary"]["draft"], measure=args.decode)
        if kept is not None:
            info["decoding"] = measured(kept)
        info["eval_settings"] = args.eval_set
        info["wall_minutes"] = round((time.time() - started) / 60, 1)
        done[name] = info
        report(_with_earlier(done, earlier), out, args.minutes)
        print(f"{name}: written into {out}/table.md", flush=True)


if __name__ == "__main__":
    main()
