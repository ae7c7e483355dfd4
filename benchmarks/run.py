"""Speed benchmarks of the SortedNet mechanism on ResNet-50 (small stem, Fashion-MNIST shapes).

Usage::

    .venv/bin/python benchmarks/run.py [--device auto|cpu|cuda] [--quick] [--profile] [--out FILE.json]
    make bench                       # the same, device auto, full length

Everything runs in one process. Each comparison interleaves its cases (A B, then B A, ...) after a
warm-up and reports the median over repetitions of the back-to-back ratio A_r / B_r. A shared machine
has bursts in which everything runs several times slower, so only *clean* repetitions count: those in
which every case took at most ``NOISE_TOL`` (1.3) x its fastest time. Repetitions go on (up to 3 x)
until enough are clean; the detail column says how many were. On CUDA every timing is bracketed by
``torch.cuda.synchronize()`` and runs under bf16 autocast (``sortedcli.engine.autocast``) as training
does; on the CPU it runs in fp32 with torch's default threads. Model: ``models.create("resnet50", 10,
1, small_stem=True)``, input 1x28x28, batch 32 (CPU) or 256 (CUDA), SGD(lr 0.1, momentum 0.9,
nesterov, wd 5e-4) as ``conf/optim/sgd.yaml``. Batches come from Fashion-MNIST when it is installed
(``/usr/share/datasets/fashion-mnist``), else from random tensors (timings do not depend on pixels).

1. **Nesting overhead** (target <= 1.05x): one training step (zero_grad, forward, cross-entropy,
   backward, SGD step) of the sorted model's full sub-model (``with use(model, grid.largest)``)
   divided by the same step of the plain torchvision ResNet-50 with identical weights
   (``extract(model, None, example)``).
2. **Real savings**: training-step time of width 0.5 and width 0.25 (depth 16) over the full
   sub-model, divided by their FLOPs ratio (``sortedcli.flops.measure``). Targets: <= 1.4 (w0.5) and
   <= 2.5 (w0.25). Also prints the forward / backward / optimizer split of each step.
3. **SortedNet vs plain training per epoch** (target <= 0.6x): the same N Fashion-MNIST batches
   (``epoch_loader``, seed 0) are trained with ``engine.train_step`` on two identically initialised
   models, one with ``SortedNetSampler(grid, g=1)`` over the 160-member grid (width 0.1..1.0 x depth
   1..16), one with ``FullSampler(grid)``; steps alternate between them. The ratio of the summed step
   times is the per-epoch ratio (data loading, identical for both, is timed separately and reported).
4. **Exported budget-0.5 model** (target <= 0.6x): the largest grid sub-model with FLOPs <= 0.5 x full
   is cut out with ``extract`` and its eval-mode inference latency (batch 1 and 32) compared with
   the plain full model (``extract(model, None, ...)``).

``--profile`` adds ``torch.profiler`` op tables (self time; CUDA kernels on the GPU): the share of
convolutions in a width-0.25 step, and the ops on which a full sorted step spends more than the plain one.

The table (what, measured, target, pass, detail) is printed and every number, with the raw timings,
is written to ``benchmarks/results-<device>.json`` (or ``--out``). ``--quick`` shortens every loop: a
smoke test, not a measurement. ``--model resnet_tiny --quick`` (a few seconds) is what the test suite
runs (``tests/test_benchmarks.py``), so that an API change cannot break the benchmark unseen. A full run takes about 3-5 minutes on 2 CPU cores, 1 minute on an H100.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from sortedcli import models  # noqa: E402
from sortedcli.engine import Distill, autocast, autocast_dtype, epoch_loader, pick_device, train_step  # noqa: E402
from sortedcli.tasks import ImageClassification  # noqa: E402

IMAGES = ImageClassification()
from sortedcli.flops import measure  # noqa: E402
from sortedcli.nest import COUNT, FRACTION, Dim, Grid, SubModel, extract, nesting, use  # noqa: E402
from sortedcli.sampling import FullSampler, SortedNetSampler  # noqa: E402

WIDTHS = tuple(round(0.1 * k, 1) for k in range(1, 11))
NOISE_TOL = 1.3  # a repetition slower than this x the fastest one was hit by another load
CONV_OPS = ("conv", "cudnn", "mkldnn", "fprop", "dgrad", "wgrad")  # convolution op/kernel names (--profile)


class Bench:
    """Device, precision, batches and the timing primitives shared by every measurement."""

    def __init__(self, device: torch.device, quick: bool, arch: str = "resnet50"):
        self.device, self.quick, self.arch = device, quick, arch
        self.cuda = device.type == "cuda"
        self.amp = autocast_dtype(device)
        self.batch = 256 if self.cuda else 32
        self.reps = 3 if quick else (15 if self.cuda else 11)
        self.steps_per_rep = 5 if self.cuda else 1  # training steps timed together in one repetition
        self.epoch_steps = (40 if quick else 200) if self.cuda else (8 if quick else 40)
        self.extend_s = 15 if quick else 60  # how long a comparison may go on to find clean repetitions
        self.example = torch.zeros(1, 1, 28, 28, device=device)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def interleaved(self, cases: dict, reps: int, warmup: int = 2) -> "Timings":
        """Seconds per call of each case, the order reversed every other repetition. Repetitions go
        on (up to 3 x ``reps``, while the comparison has run less than ``extend_s``) until half of
        ``reps`` (at least 3) are *clean* (see :class:`Timings`)."""
        for fn in cases.values():
            for _ in range(warmup):
                fn()
        names, t = list(cases), Timings({n: [] for n in cases})
        need, start = max(3, (reps + 1) // 2), time.perf_counter()
        while t.reps < reps or (len(t.clean()) < need and t.reps < 3 * reps
                                and time.perf_counter() - start < self.extend_s):
            for n in (names if t.reps % 2 == 0 else names[::-1]):
                t.times[n].append(self.timed(cases[n]))
        return t

    def sgd(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def new_model(self, seed: int = 0):
        torch.manual_seed(seed)
        return models.create(self.arch, num_classes=10, in_channels=1, small_stem=True).to(self.device).train()


class Timings:
    """Interleaved timings ``{case: [seconds per repetition]}``.

    A shared machine has bursts in which everything runs several times slower. A repetition is
    *clean* when every case took at most ``NOISE_TOL`` x its fastest repetition; ratios are medians
    over clean repetitions of the back-to-back pair ratios (over all of them if fewer than 3 are clean).
    """

    def __init__(self, times: dict[str, list[float]]):
        self.times = times

    @property
    def reps(self) -> int:
        return len(next(iter(self.times.values())))

    def clean(self) -> list[int]:
        fastest = {n: min(v, default=0) for n, v in self.times.items()}
        return [r for r in range(self.reps) if all(v[r] <= NOISE_TOL * fastest[n] for n, v in self.times.items())]

    def _used(self) -> list[int]:
        clean = self.clean()
        return clean if len(clean) >= 3 else list(range(self.reps))

    def ratios(self, a: str, b: str) -> list[float]:
        return [self.times[a][r] / self.times[b][r] for r in self._used()]

    def ratio(self, a: str, b: str) -> float:
        return statistics.median(self.ratios(a, b))

    def seconds(self, case: str) -> float:
        return statistics.median(self.times[case][r] for r in self._used())

    def spread(self, a: str, b: str) -> str:
        """Range of the pair ratios used, and how many repetitions were clean."""
        r, clean = self.ratios(a, b), len(self.clean())
        used = f"{clean} clean of {self.reps} reps" if clean >= 3 else f"all {self.reps} reps, only {clean} clean"
        return f"pairs {min(r):.2f}-{max(r):.2f}, {used}"

    def as_json(self, a: str, b: str) -> dict:
        return {"times_s": self.times, "clean_reps": self.clean(),
                "ratio_of_fastest": min(self.times[a]) / min(self.times[b])}


def load_batches(bench: Bench, n: int) -> tuple[list, float, str]:
    """``n`` Fashion-MNIST training batches (epoch 0, seed 0) on the device, the seconds per batch the
    loader took, and the data source (random tensors when the dataset is not installed)."""
    try:
        from sortedcli.data.vision import build_vision_data
        data = build_vision_data({"name": "fashion_mnist"})
        loader = epoch_loader(data.train, bench.batch, seed=0, epoch=0)
        t0, batches = time.perf_counter(), []
        for x, y in loader:
            batches.append((x, y))
            if len(batches) == n:
                break
        per_batch, source = (time.perf_counter() - t0) / len(batches), "fashion-mnist"
    except Exception as e:  # noqa: BLE001 - no dataset: timings do not depend on pixel values
        print(f"(Fashion-MNIST unavailable: {e}; using random tensors)", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(bench.batch, 1, 28, 28, generator=g), torch.randint(0, 10, (bench.batch,), generator=g))
                   for _ in range(n)]
        per_batch, source = 0.0, "random"
    return [(x.to(bench.device), y.to(bench.device)) for x, y in batches], per_batch, source


def step_fn(bench: Bench, model, sub, batches, phases: list | None = None):
    """A closure doing ``bench.steps_per_rep`` training steps of ``model`` (as ``sub`` when sorted,
    ``sub=False`` for a plain model), cycling through ``batches``; ``phases`` collects
    (forward, backward, optimizer) seconds per step when given."""
    opt, state = bench.sgd(model), {"i": 0}

    def clock(t0):
        bench.sync()
        t = time.perf_counter()
        return t - t0, t

    def run():
        for _ in range(bench.steps_per_rep):
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with (contextlib.nullcontext() if sub is False else use(model, sub)), autocast(bench.device, bench.amp):
                loss = F.cross_entropy(model(x).float(), y)
            if phases is not None:
                fwd, t = clock(t)
            loss.backward()
            if phases is not None:
                bwd, t = clock(t)
            opt.step()
            if phases is not None:
                phases.append((fwd, bwd, clock(t)[0]))
        state["loss"] = loss.item()  # one host sync per repetition, as the engine's loss.item()

    return run, state


def nesting_overhead(bench, model, grid, batches, out, checks):
    plain = extract(model, None, bench.example).train()  # plain torchvision ResNet, same weights
    (sorted_run, s_state), (plain_run, p_state) = (step_fn(bench, model, grid.largest, batches),
                                                   step_fn(bench, plain, False, batches))
    t = bench.interleaved({"sorted": sorted_run, "plain": plain_run}, bench.reps)
    if not all(math.isfinite(st["loss"]) for st in (s_state, p_state)):
        print("warning: the training loss diverged during the timing (non-finite)", file=sys.stderr)
    k = bench.steps_per_rep
    res = out["nesting_overhead"] = {
        "ratio": t.ratio("sorted", "plain"), "sorted_step_s": t.seconds("sorted") / k,
        "plain_step_s": t.seconds("plain") / k, "last_loss": {"sorted": s_state["loss"], "plain": p_state["loss"]},
        **t.as_json("sorted", "plain")}
    checks.append(("1. full sorted / plain, train step", res["ratio"], 1.05,
                   f"{res['sorted_step_s'] * 1e3:.1f} vs {res['plain_step_s'] * 1e3:.1f} ms; "
                   f"{t.spread('sorted', 'plain')}"))


def real_savings(bench, model, costs, batches, out, checks):
    depth = nesting(model).depth  # all of it: 16 blocks for ResNet-50
    subs = {"full": None, "w0.5": SubModel.of(width=0.5, depth=depth), "w0.25": SubModel.of(width=0.25, depth=depth)}
    flops = {n: measure(model, s, bench.example).flops / costs[None].flops for n, s in subs.items()}
    t = bench.interleaved({n: step_fn(bench, model, s, batches)[0] for n, s in subs.items()}, bench.reps)
    split = {}
    for n, s in subs.items():  # forward / backward / optimizer split (extra syncs, so timed apart)
        phases = []
        run, _ = step_fn(bench, model, s, batches, phases)
        for _ in range(4):
            run()
        split[n] = [min(p[i] for p in phases[1:]) for i in range(3)]  # fastest of each: noise only adds
    res = out["real_savings"] = {"flops_ratio": flops, "fwd_bwd_opt_s": split, **t.as_json("w0.25", "full"),
                                 "step_s": {n: t.seconds(n) / bench.steps_per_rep for n in subs}}
    for n, target in (("w0.5", 1.4), ("w0.25", 2.5)):
        ratio = res[f"time_ratio_{n}"] = t.ratio(n, "full")
        checks.append((f"2. {n}: time ratio / FLOPs ratio", ratio / flops[n], target,
                       f"time {ratio:.3f}, FLOPs {flops[n]:.3f}; {t.spread(n, 'full')}"))
    print("where the time goes (forward / backward / optimizer, ms per step): " + "; ".join(
        f"{n} {f * 1e3:.1f} / {b * 1e3:.1f} / {o * 1e3:.1f}" for n, (f, b, o) in split.items()))


def op_times(bench, run) -> dict[str, float]:
    """Self time (s) per op of a profiled call of ``run``: CPU ops on the CPU, kernels on CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run()
    best = None
    for _ in range(2):  # the quieter of two profiled calls
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])) as prof:
            run()
        if bench.cuda:
            ops = {e.key: e.self_device_time_total / 1e6 for e in prof.key_averages()
                   if e.device_type == DeviceType.CUDA}
        else:
            ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        best = ops if best is None or sum(ops.values()) < sum(best.values()) else best
    return best


def profile_steps(bench, model, plain, grid, batches) -> dict:
    """--profile: the convolutions' share of a width-0.25 step, and the ops where a full sorted step
    spends more than the plain one."""
    where = "GPU kernel" if bench.cuda else "CPU"
    ops = op_times(bench, step_fn(bench, model, SubModel.of(width=0.25, depth=nesting(model).depth), batches)[0])
    total = sum(ops.values()) or 1
    conv = sum(v for k, v in ops.items() if any(c in k.lower() for c in CONV_OPS)) / total
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:5]
    print(f"profile w0.25 ({where} self time): convolutions {conv:.0%}; top: "
          + ", ".join(f"{k[:40]} {v / total:.0%}" for k, v in top))
    mine = op_times(bench, step_fn(bench, model, grid.largest, batches)[0])
    base = op_times(bench, step_fn(bench, plain, False, batches)[0])
    extra = sorted(((mine.get(k, 0) - base.get(k, 0), k) for k in set(mine) | set(base)), reverse=True)[:5]
    print(f"profile full sorted - plain ({where} self time, {bench.steps_per_rep} steps): "
          f"{sum(mine.values()) * 1e3:.1f} vs {sum(base.values()) * 1e3:.1f} ms; most extra: "
          + ", ".join(f"{k[:40]} {d * 1e3:+.1f} ms" for d, k in extra))
    return {"w0.25_conv_fraction": conv, "w0.25_top_ops": {k: v / total for k, v in top},
            "sorted_minus_plain_s": {k: d for d, k in extra},
            "sorted_total_s": sum(mine.values()), "plain_total_s": sum(base.values())}


def sortednet_epoch(bench, grid, costs, out, checks):
    n, warm = bench.epoch_steps, 2
    batches, load_s, source = load_batches(bench, n + warm)
    runs = {}
    for name, sampler in (("sortednet", SortedNetSampler(grid, seed=0, g=1)), ("full", FullSampler(grid))):
        model = bench.new_model(seed=0)  # identical initial weights for both
        runs[name] = {"model": model, "opt": bench.sgd(model), "sampler": sampler, "times": [],
                      "subs": [], "warm_subs": []}

    def one(r, x, y, record=True):
        subs = r["sampler"].step()
        (r["subs"] if record else r["warm_subs"]).extend(subs)
        train_step(r["model"], IMAGES, subs, (x, y), r["opt"], grid.largest, Distill(), bench.device, bench.amp)

    for x, y in batches[:warm]:  # warm-up (the sortednet sampler draws its warm-up sub-models too)
        for r in runs.values():
            one(r, x, y, record=False)
    for i, (x, y) in enumerate(batches[warm:]):  # the two samplers alternate, step by step
        for r in (list(runs.values()) if i % 2 == 0 else list(runs.values())[::-1]):
            r["times"].append(bench.timed(lambda: one(r, x, y)))
    s_t, f_t = runs["sortednet"]["times"], runs["full"]["times"]
    ratio = sum(s_t) / sum(f_t)
    # Noise: the full step costs the same every time, so it probes the machine. Pairs whose full
    # step ran > NOISE_TOL x its fastest were hit by another load; the same pairs are left out of both.
    clean = [i for i in range(n) if f_t[i] <= NOISE_TOL * min(f_t)]
    robust = sum(s_t[i] for i in clean) / sum(f_t[i] for i in clean) if len(clean) >= max(5, n // 4) else ratio
    # Steps whose width was never run before pay one-off costs (on CUDA: cuDNN plans for new shapes).
    widths, first = {s.get("width") for s in runs["sortednet"]["warm_subs"]}, []
    for i, sub in enumerate(runs["sortednet"]["subs"]):
        if sub.get("width") not in widths:
            first.append(i)
            widths.add(sub.get("width"))
    later = [i for i in range(n) if i not in first]
    drawn = statistics.mean(costs[s].flops for s in runs["sortednet"]["subs"]) / costs[None].flops
    grid_mean = statistics.mean(costs[s].flops for s in grid) / costs[None].flops
    out["sortednet_epoch"] = {
        "steps": n, "data": source, "ratio": robust, "ratio_all_steps": ratio, "clean_steps": clean,
        "total_s": {"sortednet": sum(s_t), "full": sum(f_t)}, "times_s": {"sortednet": s_t, "full": f_t},
        "ratio_incl_data_loading": (sum(s_t) + n * load_s) / (sum(f_t) + n * load_s),
        "load_s_per_batch": load_s, "drawn_mean_flops_fraction": drawn, "grid_mean_flops_fraction": grid_mean,
        "first_width_steps": first, "first_width_s": sum(s_t[i] for i in first),
        "ratio_without_first_width_steps": sum(s_t[i] for i in later) / sum(f_t[i] for i in later) if later else None}
    checks.append(("3. sortednet g=1 / full, epoch time", robust, 0.6,
                   f"{len(clean)}/{n} clean steps{'' if len(clean) >= max(5, n // 4) else ' (too few)'}, all steps "
                   f"{ratio:.3f}; FLOPs of the draws {drawn:.3f} (grid mean {grid_mean:.3f})"))


def exported_latency(bench, model, grid, costs, out, checks):
    full = costs[None].flops
    fits = [s for s in grid if costs[s].flops <= 0.5 * full]
    chosen = max(fits, key=lambda s: (costs[s].flops, s.levels))  # as `sortednet export` without eval results
    model.eval()
    small, plain = extract(model, chosen, bench.example), extract(model, None, bench.example)
    print(f"budget 0.5: {len(fits)} of {len(grid)} sub-models fit; chosen {chosen} "
          f"({costs[chosen].flops / full:.3f} of the full FLOPs, {costs[chosen].params / 1e6:.2f}M of "
          f"{costs[None].params / 1e6:.2f}M params)")
    res = out["exported_latency"] = {"submodel": chosen.name, "flops_fraction": costs[chosen].flops / full}
    for batch in (1, 32):
        x = torch.randn(batch, 1, 28, 28, device=bench.device)
        calls = 20 if batch == 1 or bench.cuda else 3  # calls per repetition: long enough for the timer

        def infer(m):
            def run():
                with torch.inference_mode(), autocast(bench.device, bench.amp):
                    for _ in range(calls):
                        m(x)
            return run

        t = bench.interleaved({"exported": infer(small), "full": infer(plain)}, max(bench.reps, 5))
        r = res[f"batch{batch}"] = {"ratio": t.ratio("exported", "full"), **t.as_json("exported", "full"),
                                    "exported_ms": 1e3 * t.seconds("exported") / calls,
                                    "full_ms": 1e3 * t.seconds("full") / calls}
        checks.append((f"4. exported budget-0.5 / full, batch {batch}", r["ratio"], 0.6,
                       f"{r['exported_ms']:.2f} vs {r['full_ms']:.2f} ms; {t.spread('exported', 'full')}"))
    model.train()


def print_checks(checks: list[tuple]) -> None:
    """The table of ``(what, measured, target or None, detail)`` rows every benchmark prints."""
    rows = [(w, f"{v:.3f}", "report" if tgt is None else f"<= {tgt:g}",
             "-" if tgt is None else ("PASS" if v <= tgt else "FAIL"), d) for w, v, tgt, d in checks]
    header = ("what", "measured", "target", "result", "detail")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    print()
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="short loops: a smoke test, not a measurement")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler: conv share of a width-0.25 step, full sorted vs plain ops")
    ap.add_argument("--out", type=Path, help="JSON file (default benchmarks/results-<device>.json)")
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "resnet18", "resnet_tiny"],
                    help="the sorted ResNet (default resnet50, the measurement; resnet_tiny: a smoke test)")
    args = ap.parse_args(argv)
    if args.model != "resnet50" and not args.out:
        ap.error("--model other than resnet50 is a smoke test: pass --out FILE, so the results stay")

    device = pick_device(args.device)
    bench = Bench(device, args.quick, args.model)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if bench.cuda else (platform.processor() or platform.machine())
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {bench.batch}, amp {bench.amp}, {'quick' if args.quick else 'full'} run")

    model = bench.new_model(seed=0)
    depth = nesting(model).depth
    grid = Grid((Dim("width", FRACTION, WIDTHS), Dim("depth", COUNT, tuple(range(1, depth + 1)))))
    costs = {None: measure(model, None, bench.example)}
    costs.update({s: measure(model, s, bench.example) for s in grid})
    print(f"grid: {len(grid)} sub-models; full model {costs[None].flops / 1e9:.2f} GFLOPs/sample, "
          f"{costs[None].params / 1e6:.1f}M params ({time.perf_counter() - started:.0f}s)")

    out, checks = {}, []
    batches = load_batches(bench, 4)[0]
    sections = [("nesting overhead", lambda: nesting_overhead(bench, model, grid, batches, out, checks)),
                ("real savings", lambda: real_savings(bench, model, costs, batches, out, checks)),
                ("sortednet epoch", lambda: sortednet_epoch(bench, grid, costs, out, checks)),
                ("exported latency", lambda: exported_latency(bench, model, grid, costs, out, checks))]
    if args.profile:
        plain = extract(model, None, bench.example).train()
        sections.append(("profile", lambda: out.update(profile=profile_steps(bench, model, plain, grid, batches))))
    for title, section in sections:
        t0 = time.perf_counter()
        section()
        print(f"[{title}: {time.perf_counter() - t0:.0f}s]", flush=True)

    print_checks(checks)

    path = args.out or Path(__file__).resolve().parent / f"results-{device.type}.json"
    report = {"model": args.model, "device": str(device), "device_name": name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch": bench.batch, "amp": str(bench.amp),
              "quick": args.quick, "reps": bench.reps, "steps_per_rep": bench.steps_per_rep,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "elapsed_s": time.perf_counter() - started,
              "checks": [{"what": w, "measured": v, "target": t, "pass": v <= t, "detail": d}
                         for w, v, t, d in checks], **out}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path} ({report['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
