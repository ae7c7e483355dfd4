"""Quiet-machine costs of SmolLM2-135M (c per exit, full head and 8192-token draft head; v(T)) and what
acceptance each exit needs for 1.1x (and 1.0x), beside the a the 30-minute study measured. Run from the
repository root: .venv/bin/python docs/results/smollm2/study-quiet/bound.py (about 1 minute; `make smollm`)."""
import json, os, sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
from transformers import AutoModelForCausalLM
from sortedcli.models.decoder import DecoderStack
from sortedcli import draft
torch.set_num_threads(2)
m = AutoModelForCausalLM.from_pretrained(os.path.expanduser("~/.cache/sortednet/smollm2-135m-instruct"), dtype=torch.float32).eval()
st = DecoderStack(m)
exits = [3, 6, 9, 12, 15, 18, 21, 24, 27]
vocab = torch.arange(8192)  # a stand-in of the right size: cost depends on the count of rows only
print("load", os.getloadavg(), flush=True)
v = draft.verify_ratios(st, reps=9)
c = draft.cost_ratios(st, exits, warmup=3, reps=15, vocabs={8192: vocab})
print("load", os.getloadavg(), flush=True)
study = json.load(open(ROOT / "docs/results/smollm2/study-30min/study.json"))["arms"]
def need(cc, target=1.1):
    lo, hi = 0.0, 1.0
    if draft.best_k(1.0, cc, verify=v)[1] < target:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        if draft.best_k(mid, cc, verify=v)[1] >= target: hi = mid
        else: lo = mid
    return hi
rows = []
for e in exits:
    row = {"exit": e, "c": c[e, None], "c8192": c[e, 8192], "a_for_1.1x": need(c[e, None]),
           "a_for_1.1x_8192": need(c[e, 8192]), "a_for_1.0x_8192": need(c[e, 8192], 1.0)}
    for arm in ("untouched", "soft_all", "exit_readouts", "soft_then_readouts"):
        a = study[arm]["summary"]["exits"].get(str(e), {}).get("agreement")
        if a is not None:
            row[arm] = {"a": a, "k_speedup_8192": draft.best_k(a, c[e, 8192], verify=v)}
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump({"verify": v, "rows": rows, "threads": torch.get_num_threads()},
          open(Path(__file__).with_name("bound.json"), "w"), indent=1)
print("verify", v)
