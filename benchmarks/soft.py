"""SoFT's training cost next to standard fine-tuning: step time and peak memory, ``sampler=all`` (every
exit's loss, one trunk pass) over ``sampler=full`` (the full model only), same model and batches.

Usage::

    .venv/bin/python benchmarks/soft.py [--model DIR] [--steps 6] [--batch 8] [--device auto] [--sampled 3]

``--model DIR``: a ``LlamaForCausalLM`` folder with its tokenizer (e.g. a news_llama_pretrain export);
default: the news_llama_pretrain architecture, randomly initialized, with the project's tokenizer.
Batches are GSM8K training examples (``data=gsm8k``, loss on answers). Time: the two samplers'
training steps (``engine.train_step``) alternate on the same batches after a warm-up; the ratio is the
median of per-pair ratios. Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the steps of each
sampler (reset in between); on the CPU each sampler runs in a fresh process and reports its peak
resident set growth over the model already loaded (``ru_maxrss``). ``--sampled G`` also
times ``sampler=sortednet g=G`` (G exits drawn per step, the trunk run to the deepest drawn one; the same
seeded draws in every process) against the same SFT steps; with ``--largest`` the full model trains
beside them every step (smollm2_soft's default, ``sampler=sortednet_g3_largest``: ``--every 3 --sampled 3
--largest``). Every step computes the heads at the counted
places only, chunk by chunk (``engine.exit_losses``); the load average before and after goes into the
result. Targets (issue 7): time <= 1.1x,
memory <= 1.3x; the paper measured 0.98x and +25% on LLaMA-2 13B, whose LM head is a negligible part
of the compute, while a small model's head is not: SoFT evaluates it once per exit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sortedcli.data import build_data  # noqa: E402
from sortedcli.engine import Distill, train_step  # noqa: E402
from sortedcli.models import create, tokenizer as model_tokenizer  # noqa: E402
from sortedcli.nest import COUNT, Dim, Grid, nesting  # noqa: E402
from sortedcli.sampling import create_sampler  # noqa: E402

RECIPE = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 8, "num_attention_heads": 8,
          "num_key_value_heads": 4, "max_position_embeddings": 1024, "tie_word_embeddings": False}


def setup(args, device):
    options = {"name": "llama", "pretrained": args.model, "tokenizer": None}
    tok = model_tokenizer(options)
    data = build_data({"name": "gsm8k", "max_length": 384}, tok)
    torch.manual_seed(0)
    model = create("llama", **data.model_args, pretrained=args.model, config=None if args.model else dict(RECIPE))
    model.to(device).train()
    depth = nesting(model).depth
    exits = sorted({*range(args.every, depth + 1, args.every), depth})  # the recipes' exits: every N layers
    grid = Grid((Dim("depth", COUNT, tuple(exits)),))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data.train), generator=g).tolist()
    batches = [data.task.to_device(data.collate([data.train[i] for i in order[b * args.batch:(b + 1) * args.batch]]),
                                   device) for b in range(args.steps + 1)]
    return model, grid, data.task, batches


def sampler(args, name, grid):
    """The named schedule: ``all``, ``full``, or ``sampled`` (sortednet, ``--sampled`` exits a step, and
    the full model beside them with ``--largest``: smollm2_soft's ``sampler=sortednet_g3_largest``)."""
    if name == "sampled":
        return create_sampler("sortednet", grid, g=args.sampled, largest=args.largest)
    return create_sampler(name, grid)


def one_sampler(args, name):
    """Child process (CPU memory): steps of one sampler; prints the peak RSS growth in MiB."""
    device = torch.device("cpu")
    model, grid, task, batches = setup(args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    draws = sampler(args, name, grid)
    subs = draws.step()
    train_step(model, task, subs, batches[0], opt, grid.largest, Distill(), device, None)  # optimizer state exists
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_now = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024
    for batch in batches[1:]:
        train_step(model, task, draws.step() if name == "sampled" else subs, batch, opt, grid.largest, Distill(),
                   device, None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_mib": (max(peak, before) - rss_now) / 1024}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--every", type=int, default=1, help="an exit every N layers (smollm2_soft: 3)")
    ap.add_argument("--sampled", type=int, default=0, help="also time sampler=sortednet with g=N exits a step")
    ap.add_argument("--largest", action="store_true",
                    help="the sampled steps also train the full model (sortednet largest=true)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out")
    ap.add_argument("--child", choices=["all", "full", "sampled"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return one_sampler(args, args.child)
    load = [os.getloadavg()[0]]
    names = ("all", "full", "sampled") if args.sampled else ("all", "full")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, grid, task, batches = setup(args, device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    opts = {n: torch.optim.AdamW(model.parameters(), lr=0.0) for n in names}  # lr 0: same weights
    draws = {n: sampler(args, n, grid) for n in names}
    subs = {n: draws[n].step() for n in names}

    def step(name, batch):
        if name == "sampled":
            subs[name] = draws[name].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_step(model, task, subs[name], batch, opts[name], grid.largest, Distill(), device, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for name in names:  # warm-up
        step(name, batches[0])
    times = {n: [] for n in names}
    for i, batch in enumerate(batches[1:]):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(step(name, batch))
    ratio = statistics.median(a / f for a, f in zip(times["all"], times["full"]))
    memory = {}
    if device.type == "cuda":
        for name in names:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for batch in batches[1:3]:
                step(name, batch)
            memory[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        for name in names:
            cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--every", str(args.every), "--sampled", str(args.sampled), "--threads", str(args.threads)]
            cmd += ["--largest"] if args.largest else []
            cmd += ["--model", args.model] if args.model else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            memory[name] = json.loads(out)["peak_growth_mib"]
    result = {"device": str(device), "model": args.model or "news_llama_pretrain architecture, random init",
              "exits": len(subs["all"]), "batch": args.batch, "steps": args.steps,
              "step_s": {n: statistics.median(v) for n, v in times.items()}, "time_ratio": ratio,
              "peak_memory_mib": memory, "memory_ratio": memory["all"] / memory["full"] if memory.get("full") else None,
              "threads": torch.get_num_threads(), "load_average": [*load, os.getloadavg()[0]]}
    if args.sampled:
        result["sampled"] = {"sampler": f"sortednet g={args.sampled}" + (" largest=true" if args.largest else ""),
                             "time_ratio": statistics.median(a / f for a, f in zip(times["sampled"], times["full"])),
                             "memory_ratio": memory["sampled"] / memory["full"] if memory.get("full") else None}
    print(f"SoFT (sampler=all, {len(subs['all'])} exits) / SFT (sampler=full) on {device}, batch {args.batch} GSM8K:")
    print(f"  step time {result['step_s']['all']:.3f}s / {result['step_s']['full']:.3f}s = {ratio:.2f}x (target <= 1.1)")
    print(f"  peak memory {memory['all']:.0f} / {memory['full']:.0f} MiB = {result['memory_ratio']:.2f}x (target <= 1.3)")
    if args.sampled:
        print(f"  {result['sampled']['sampler']}: step time {result['step_s']['sampled']:.3f}s = "
              f"{result['sampled']['time_ratio']:.2f}x, peak memory {memory['sampled']:.0f} MiB = "
              f"{result['sampled']['memory_ratio']:.2f}x of SFT")
    print(f"  load average {result['load_average'][0]:.2f} before, {result['load_average'][1]:.2f} after")
    out = Path(args.out or Path(__file__).resolve().parent / f"results-soft-{device.type}.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
