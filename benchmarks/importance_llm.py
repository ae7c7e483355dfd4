"""Importance sorting on a pretrained decoder: how much of a narrow sub-model's quality the weight-norm
order keeps, before any sorted fine-tuning.

Usage::

    .venv/bin/python benchmarks/importance_llm.py [--model DIR] [--items 16] [--out FILE.json]

``--model``: a Hugging Face decoder folder (default: SmolLM2-135M-Instruct from ``make smollm``). The
model is loaded three times: in its own unit order (``model.importance=none``) and importance-sorted by
the L1 and L2 norms of each key/value group's q/k/v rows and each FFN neuron's gate/up rows. Each time,
the perplexity of the GSM8K answers (in the model's chat template) is measured for the full model and
for width sub-models (heads: whole key/value groups; ffn: a prefix of the neurons). The full model's
perplexity must be the same in every order (sorting is a permutation); a better order gives the
narrow sub-models a lower perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sortedcli.cache import cache_dir  # noqa: E402
from sortedcli.data import build_data  # noqa: E402
from sortedcli.models import create, tokenizer as model_tokenizer  # noqa: E402
from sortedcli.nest import SubModel, use  # noqa: E402

#: sub-models measured (SmolLM2: 3 key/value groups, so heads 0.6 keeps 2 groups and 0.3 keeps 1)
SUBS = {"full": {}, "ffn 0.5": {"ffn": 0.5}, "heads 2/3": {"heads": 0.6}, "heads 1/3": {"heads": 0.3},
        "heads 2/3 + ffn 0.5": {"heads": 0.6, "ffn": 0.5}, "ffn 0.25": {"ffn": 0.25}}


@torch.no_grad()
def perplexity(model, batches, sub) -> float:
    nll, count = 0.0, 0
    with use(model, SubModel.of(**sub) if sub else None):
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            keep = labels != -100
            nll += torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="sum").item()
            count += int(keep.sum())
    return math.exp(nll / count)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(cache_dir() / "smollm2-135m-instruct"))
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    tok = model_tokenizer({"name": "causal_lm", "pretrained": args.model})
    data = build_data({"name": "gsm8k", "max_length": 384, "val_fraction": 0}, tok)
    items = [data.test[i] for i in range(min(args.items, len(data.test)))]
    batches = [data.collate(items[i:i + 4]) for i in range(0, len(items), 4)]
    results = {}
    for method in ("none", "l1", "l2"):
        model = create("causal_lm", **data.model_args, pretrained=args.model, importance=method).eval()
        results[method] = {name: perplexity(model, batches, sub) for name, sub in SUBS.items()}
        print(method, {k: round(v, 2) for k, v in results[method].items()}, flush=True)
    print("\n| sub-model | unsorted | l1 | l2 |\n|---|---|---|---|")
    for name in SUBS:
        print(f"| {name} | " + " | ".join(f"{results[m][name]:.2f}" for m in ("none", "l1", "l2")) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "items": len(items), "perplexity": results},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
