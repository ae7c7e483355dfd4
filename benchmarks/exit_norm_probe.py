"""Would exits with weights of their own agree with the full model more? A probe on a frozen model.

Usage::

    .venv/bin/python benchmarks/exit_norm_probe.py [--model runs/smollm2-study/untouched/full-model]
        [--exits 15,24] [--train-items 240] [--steps 300] [--out docs/results/smollm2/exit-norm-probe.json]

SoFT's exits read their hidden state through the model's own final norm and LM head, so an exit can
only improve by moving the trunk, which the full model shares (issue 21's anchored arms: the anchor and
the exits pull on the same weights). This probe freezes the whole model (so the full model's answers
cannot change: a0 = 1 by construction) and asks how far the exits get with weights only they own,
trained by KL(full || exit) on the study's GSM8K chats (the counted answer tokens):

- ``shared``: the model's own final norm (what SoFT's exits read today), nothing trained;
- ``norm``: a final-norm weight per exit (576 numbers, started from the model's): it folds into an
  exported depth-k model as that model's ``norm.weight``, so a plain transformers model keeps loading;
- ``affine``: a 576 x 576 linear map per exit before the norm (the "tuned lens"), started at the
  identity; it costs 0.7 MFLOP a token beside the head's 57, but does not fold into a plain model;
- ``mlp``: a residual MLP per exit before the norm, ``x + down(silu(up(rmsnorm(x))))`` with
  ``--mlp-width`` hidden units (down started at zero: the identity first), a nonlinear readout
  (Medusa's heads are residual blocks); ``affine_mlp``: the affine map's linear path beside it;
- ``layer``: a readout that attends over the sequence, a trainable copy of decoder layer k (the next
  one: it starts as exit k + 1's shared readout) and of the final norm, trained on whole sequences of
  the layer-k states (``--layer-steps``, ``--layer-lr``); drafting with it costs k + 1 layers, so it
  compares with exit k + 1's ``affine``.

It reports top-1 agreement with the full model on the held-out split's counted tokens (eval's a) and
the mean KL there, before and after; ``--samples N``: each exit's greedy answer (40 tokens, the
project's decoder with the exit's readout as its head) to the first N held-out questions beside the
full model's. The hidden states are computed once (the model is frozen), so the
probe is minutes of CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def hidden_states(model, data, items, exits, batch_size=4):
    """Per layer count k in ``exits`` and the last: the hidden state after the first k layers (before
    any norm) at the counted positions of ``items``."""
    from torch.utils.data import DataLoader

    layers = model.model.layers
    keep = {k: [] for k in {*exits, len(layers)}}
    caught = {}

    def catch(k):
        def hook(module, args, out):
            caught[k] = out[0] if isinstance(out, tuple) else out
        return hook

    hooks = [layers[k - 1].register_forward_hook(catch(k)) for k in keep]
    try:
        with torch.no_grad():
            for batch in DataLoader(items, batch_size=batch_size, collate_fn=data.collate):
                model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                counted = batch["labels"][:, 1:] != -100  # logits at t predict token t+1
                for k in keep:
                    keep[k].append(caught[k][:, :-1][counted])
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in keep.items()}


def sequence_states(model, data, items, k, batch_size=4):
    """Per item: the hidden state after the first ``k`` layers at every position (T x H, padding
    dropped), the counted positions (logits at t predict token t+1) and the last layer's hidden state
    there: what a readout that attends over the sequence (``layer``) trains and is measured on."""
    from torch.utils.data import DataLoader

    layers, out, caught = model.model.layers, [], {}

    def catch(j):
        def hook(module, args, o):
            caught[j] = o[0] if isinstance(o, tuple) else o
        return hook

    last = len(layers)
    hooks = [layers[j - 1].register_forward_hook(catch(j)) for j in {k, last}]
    try:
        with torch.no_grad():
            for batch in DataLoader(items, batch_size=batch_size, collate_fn=data.collate):
                model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                for i in range(batch["input_ids"].shape[0]):
                    n = int(batch["attention_mask"][i].sum())  # right padding
                    counted = torch.zeros(n, dtype=torch.bool)
                    counted[:n - 1] = batch["labels"][i, 1:n] != -100
                    out.append((caught[k][i, :n].clone(), counted, caught[last][i, :n][counted].clone()))
    finally:
        for h in hooks:
            h.remove()
    return out


class LayerExit(torch.nn.Module):
    """A readout that attends: a trainable copy of decoder layer ``k`` (the next one, so it starts as
    the shared readout of exit k + 1), then a copy of the final norm and the LM head (frozen). Drafting
    with it costs k + 1 layers (Kangaroo's adapter is an attention layer on a frozen shallow model)."""

    def __init__(self, model, k):
        super().__init__()
        self.head, self.rotary = model.lm_head, model.model.rotary_emb
        self.layer = copy.deepcopy(model.model.layers[k]).requires_grad_(True)
        self.norm = copy.deepcopy(model.model.norm).requires_grad_(True)

    def forward(self, h, counted):
        """``h``: 1 x T x H states of one sequence; logits at its ``counted`` positions."""
        pos = torch.arange(h.shape[1]).view(1, -1)
        T = h.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1).view(1, 1, T, T)
        out = self.layer(h, attention_mask=mask, position_ids=pos,
                         position_embeddings=self.rotary(h, pos))
        out = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(out[0][counted]))


def train_layer_exit(model, k, train, test, steps, lr, seqs_per_step=2):
    exit = LayerExit(model, k)
    opt = torch.optim.Adam([p for p in exit.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(k)

    def run(item):
        h, counted, top = item
        return exit(h.unsqueeze(0), counted), teacher(model, top).log_softmax(-1)

    for step in range(steps):
        loss = 0.0
        for i in torch.randint(0, len(train), (seqs_per_step,), generator=g).tolist():
            s, t = run(train[i])
            loss = loss + F.kl_div(s.log_softmax(-1), t, log_target=True, reduction="batchmean") / seqs_per_step
        opt.zero_grad()
        loss.backward()
        opt.step()

    def score(items):
        agree = kl = n = 0.0
        with torch.no_grad():
            for item in items:
                s, t = run(item)
                s = s.log_softmax(-1)
                agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
                kl += F.kl_div(s, t, log_target=True, reduction="sum").item()
                n += s.shape[0]
        return agree / n, kl / n

    return exit, score(test), score(train[:32])


class Exit(torch.nn.Module):
    """One exit's readout: a copy of the model's own final norm (trained for ``norm`` and ``affine``),
    after the identity-started map for ``affine``, then the model's LM head (frozen)."""

    def __init__(self, model, kind, mlp_width: int = 1536):
        super().__init__()
        self.kind, self.head = kind, model.lm_head
        self.norm = copy.deepcopy(model.model.norm).requires_grad_(kind != "shared")
        width = self.norm.weight.numel()
        if kind == "affine":
            self.map = torch.nn.Linear(width, width, bias=True)
            torch.nn.init.zeros_(self.map.weight)
            torch.nn.init.zeros_(self.map.bias)
        elif kind in ("mlp", "affine_mlp"):  # x + down(silu(up(norm(x)))), down at zero: the identity first
            self.map = torch.nn.Sequential(copy.deepcopy(model.model.norm).requires_grad_(True),
                                           torch.nn.Linear(width, mlp_width), torch.nn.SiLU(),
                                           torch.nn.Linear(mlp_width, width))
            torch.nn.init.zeros_(self.map[3].weight)
            torch.nn.init.zeros_(self.map[3].bias)
            if kind == "affine_mlp":  # the affine map's linear path beside the MLP
                self.linear = torch.nn.Linear(width, width, bias=False)
                torch.nn.init.zeros_(self.linear.weight)

    def forward(self, h):
        if self.kind == "affine":
            h = h + self.map(h)
        elif self.kind in ("mlp", "affine_mlp"):
            h = h + self.map(h) + (self.linear(h) if self.kind == "affine_mlp" else 0)
        return self.head(self.norm(h))


class ReadBy:
    """The model's decoding stack with its head replaced by an exit's readout (as draft.py's draft head)."""

    def __init__(self, stack, exit: Exit):
        self._stack, self._exit = stack, exit

    def head(self, hidden, layer=None):  # the stack's head(hidden, layer): this exit's readout at any layer
        return self._exit(hidden)

    def __getattr__(self, name):
        return getattr(self._stack, name)


def teacher(model, h):
    """The full model's logits from its last layer's hidden state: its own final norm and head."""
    with torch.no_grad():
        return model.lm_head(model.model.norm(h))


def measure(model, exit, h, top, chunk=1024):
    agree, kl, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, h.shape[0], chunk):
            t = teacher(model, top[i:i + chunk]).log_softmax(-1)
            s = exit(h[i:i + chunk]).log_softmax(-1)
            agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
            kl += F.kl_div(s, t, log_target=True, reduction="sum").item()
            n += s.shape[0]
    return agree / n, kl / n


@torch.no_grad()
def greedy(stack, exit, k, prompt: list[int], new_tokens: int, stop: int | None) -> list[int]:
    """Greedy text from the first ``k`` layers read out by ``exit`` (None: the model's own head), by the
    project's decoder (a cache of those layers only)."""
    from sortedcli import decoding

    reader = stack if exit is None else ReadBy(stack, exit)
    return decoding.generate(reader, prompt, exit=k, max_new_tokens=new_tokens, eos=stop).tokens


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/smollm2-study/untouched/full-model")
    ap.add_argument("--run-config", default="runs/smollm2-study/untouched/config.yaml")
    ap.add_argument("--exits", default="15,24")
    ap.add_argument("--train-items", type=int, default=240)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per step")
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam's for the norm weights")
    ap.add_argument("--map-lr", type=float, default=1e-3, help="Adam's for the affine map")
    ap.add_argument("--kinds", default="shared,norm,affine", help="of shared, norm, affine, mlp, affine_mlp")
    ap.add_argument("--mlp-width", type=int, default=1536, help="hidden units of the mlp readouts")
    ap.add_argument("--layer-steps", type=int, default=600, help="steps of the layer readout (2 sequences each)")
    ap.add_argument("--layer-lr", type=float, default=1e-4, help="Adam's for the layer readout")
    ap.add_argument("--samples", type=int, default=0,
                    help="held-out questions answered greedily by each exit (and by the full model), 40 tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torch.utils.data import Subset

    from sortedcli.data.lm import build_lm_data
    from sortedcli.models.decoder import DecoderStack

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    model.requires_grad_(False)
    cfg = OmegaConf.to_container(OmegaConf.load(args.run_config).data, resolve=True)
    cfg.update(answers="reference", val_fraction=0)
    data = build_lm_data(cfg, AutoTokenizer.from_pretrained(args.model))
    exits = [int(e) for e in args.exits.split(",")]
    if not all(1 <= k <= model.config.num_hidden_layers for k in exits):
        raise SystemExit(f"--exits must be layer counts in 1..{model.config.num_hidden_layers}, got {args.exits}")
    t0 = time.time()
    train = hidden_states(model, data, Subset(data.train, range(min(args.train_items, len(data.train)))), exits)
    test = hidden_states(model, data, data.test, exits)
    last = model.config.num_hidden_layers
    print(f"hidden states: {train[last].shape[0]} train / {test[last].shape[0]} held-out tokens "
          f"({time.time() - t0:.0f} s)", flush=True)
    results = {"model": args.model, "mlp_width": args.mlp_width, "train_tokens": train[last].shape[0], "test_tokens": test[last].shape[0],
               "steps": args.steps, "tokens_per_step": args.tokens, "lr": args.lr, "map_lr": args.map_lr,
               "exits": {}}
    prompts = [[int(i) for i in it["input_ids"][:int((it["labels"] != -100).nonzero()[0])]]  # up to the answer
               for it in (data.test[j] for j in range(min(args.samples, len(data.test))))]
    stop, say, stack = data.tokenizer.eos_token_id, data.tokenizer.decode, DecoderStack(model)
    if prompts:
        results["samples"] = {"prompts": [say(q) for q in prompts],
                              "full": [say(greedy(stack, None, last, q, 40, stop)) for q in prompts]}
    kinds = args.kinds.split(",")
    for k in exits:
        if "layer" in kinds and k < last:  # the readout that attends: trained on whole sequences, measured on every held-out one
            t0 = time.time()
            seq_train = sequence_states(model, data, Subset(data.train, range(min(args.train_items, len(data.train)))), k)
            seq_test = sequence_states(model, data, data.test, k)
            _, (a, kl), (a_train, _) = train_layer_exit(model, k, seq_train, seq_test, args.layer_steps, args.layer_lr)
            del seq_train, seq_test
            results["exits"].setdefault(str(k), {})["layer"] = {
                "a": round(a, 4), "kl": round(kl, 3), "a_train": round(a_train, 4), "steps": args.layer_steps,
                "lr": args.layer_lr, "seconds": round(time.time() - t0, 1), "draft_layers": k + 1}
            print(f"exit {k} layer   a={a:.3f} (train {a_train:.3f}) KL={kl:.3f}  {time.time() - t0:.0f} s "
                  f"(drafts with {k + 1} layers)", flush=True)
        for kind in [x for x in kinds if x != "layer"]:
            exit = Exit(model, kind, args.mlp_width)
            params = [p for p in exit.parameters() if p.requires_grad]
            t0 = time.time()
            if params:
                mapped = [p for n, p in exit.named_parameters() if p.requires_grad and not n.startswith("norm.")]
                opt = torch.optim.Adam([{"params": list(exit.norm.parameters()), "lr": args.lr},
                                        *([{"params": mapped, "lr": args.map_lr}] if mapped else [])])
                g = torch.Generator().manual_seed(k)
                for step in range(args.steps):
                    idx = torch.randint(0, train[k].shape[0], (args.tokens,), generator=g)
                    t = teacher(model, train[last][idx]).log_softmax(-1)
                    loss = F.kl_div(exit(train[k][idx]).log_softmax(-1), t, log_target=True, reduction="batchmean")
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            a, kl = measure(model, exit, test[k], test[last])
            a_train, _ = measure(model, exit, train[k][:4096], train[last][:4096])
            results["exits"].setdefault(str(k), {})[kind] = {"a": round(a, 4), "kl": round(kl, 3),
                                                             "a_train": round(a_train, 4),
                                                             "seconds": round(time.time() - t0, 1)}
            print(f"exit {k} {kind:7s} a={a:.3f} (train {a_train:.3f}) KL={kl:.3f}  {time.time() - t0:.0f} s",
                  flush=True)
            if prompts:
                texts = [say(greedy(stack, exit, k, q, 40, stop)) for q in prompts]
                results["samples"].setdefault(str(k), {})[kind] = texts
                print(f"  {texts[0]!r}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
