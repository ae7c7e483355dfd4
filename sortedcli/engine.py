"""The training loop and evaluation: plain PyTorch.

One optimizer step: the sampler names the sub-models; each runs forward and backward on the same
batch with its loss divided by their number (gradients accumulate in the shared weights); then one
optimizer step and one LR-schedule step. With in-place distillation, the largest sub-model's
(detached) output is the soft target of the others.

Data order is a seeded permutation per epoch and the step is the only position, so a run resumed
from a checkpoint sees exactly the batches, sub-models and random draws it would have seen.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler as IndexSampler

from .nest import SubModel, has_batchnorm, recalibrate, use
from .sampling import Sampler


# --- device and precision ------------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} asked for, but no CUDA GPU is available (use trainer.device=auto)")
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 autocast on a GPU that supports it (``auto``), fp32 on the CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision in ("auto", "bf16"):
        return torch.bfloat16
    raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --- data order ----------------------------------------------------------------------------------

class EpochBatches(IndexSampler):
    """Batches of indices of one epoch: a permutation seeded by ``(seed, epoch)``, full batches only,
    starting at batch ``start`` (to resume mid-epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for b in range(self.start, self.n // self.batch_size):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, start: int = 0,
                 num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    # The loader gets its own generator so that creating it never draws from the global RNG.
    return DataLoader(dataset, batch_sampler=EpochBatches(len(dataset), batch_size, seed, epoch, start),
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed + epoch))


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    return len(dataset) // batch_size


# --- one optimizer step --------------------------------------------------------------------------

@dataclass
class Distill:
    """In-place distillation from the largest sub-model (off unless ``enabled``)."""

    enabled: bool = False
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the KL term for the smaller sub-models; 1 - alpha on the labels


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, scaled by T^2 so its gradients match cross-entropy's
    magnitude (the fix for distillation losses orders of magnitude below the CE)."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def train_step(model: nn.Module, subs: list[SubModel], x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer, largest: SubModel, distill: Distill,
               device: torch.device, amp: torch.dtype | None) -> float:
    """Forward/backward every sub-model of ``subs`` on ``(x, y)``, accumulate, one optimizer step.
    Returns the mean loss."""
    optimizer.zero_grad(set_to_none=True)
    teacher = None
    if distill.enabled:
        subs = sorted(subs, key=lambda s: s != largest)  # the teacher runs first when it is sampled
        if largest not in subs:
            with torch.no_grad(), use(model, largest), autocast(device, amp):
                teacher = model(x).detach()
    total = torch.zeros((), device=x.device)
    for sub in subs:
        with use(model, sub), autocast(device, amp):
            out = model(x)
            loss = F.cross_entropy(out.float(), y)
            if teacher is not None and sub != largest:
                loss = distill.alpha * kd_loss(out, teacher, distill.temperature) + (1 - distill.alpha) * loss
        (loss / len(subs)).backward()
        if distill.enabled and sub == largest:
            teacher = out.detach()
        total += loss.detach()
    optimizer.step()
    return total.item() / len(subs)  # one host sync per step, not one per sub-model


# --- the loop ------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Where a run is: restored from and saved to checkpoints."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already done


def fit(model: nn.Module, sampler: Sampler, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, dataset: Dataset, *, epochs: int,
        batch_size: int, seed: int, device: torch.device, amp: torch.dtype | None,
        distill: Distill, progress: Progress, max_steps: int | None = None, num_workers: int = 0,
        on_step: Callable[[Progress, float], None] = lambda p, loss: None,
        on_epoch_end: Callable[[Progress], None] = lambda p: None) -> Progress:
    """Train from ``progress`` to the end of ``epochs`` (or ``max_steps`` optimizer steps)."""
    largest = sampler.grid.largest
    per_epoch = steps_per_epoch(dataset, batch_size)
    if per_epoch == 0:
        raise ValueError(f"the training set ({len(dataset)} items) is smaller than one batch ({batch_size})")
    while progress.epoch < epochs:
        model.train()  # (an epoch-end evaluation leaves it in eval mode)
        loader = epoch_loader(dataset, batch_size, seed, progress.epoch, progress.batch, num_workers,
                              pin_memory=device.type == "cuda")
        for x, y in loader:
            if max_steps is not None and progress.step >= max_steps:
                return progress
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            loss = train_step(model, sampler.step(), x, y, optimizer, largest, distill, device, amp)
            scheduler.step()
            progress.step += 1
            progress.batch += 1
            on_step(progress, loss)
        progress.epoch += 1
        progress.batch = 0
        on_epoch_end(progress)
    return progress


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    final_fraction: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- evaluation ----------------------------------------------------------------------------------

def calibration_batches(model: nn.Module, dataset: Dataset, batch_size: int, num_batches: int, seed: int,
                        device: torch.device) -> list[torch.Tensor]:
    """A fixed random sample of training inputs (no augmentation) kept on the device, reused to
    recalibrate every sub-model's BatchNorm; none when ``model`` has no BatchNorm."""
    if not has_batchnorm(model):
        return []
    n = min(num_batches, max(1, len(dataset) // batch_size))
    size = min(batch_size, len(dataset))
    loader = epoch_loader(dataset, size, seed, epoch=10**6)
    return [x.to(device) for x, _ in itertools.islice(loader, n)]


@torch.no_grad()
def accuracy(model: nn.Module, sub: SubModel | None, loader: Iterable, device: torch.device,
             amp: torch.dtype | None) -> float:
    """Top-1 accuracy in percent of ``sub`` (eval mode) over ``loader``."""
    model.eval()
    correct, total = torch.zeros((), dtype=torch.long, device=device), 0
    with use(model, sub), autocast(device, amp):
        for x, y in loader:
            pred = model(x.to(device, non_blocking=True)).argmax(-1)
            correct += (pred == y.to(device, non_blocking=True)).sum()
            total += y.numel()
    return 100.0 * correct.item() / max(1, total)  # one host sync per sub-model, not per batch


@torch.no_grad()
def latency_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds (synchronizing the GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000.0 * sorted(times)[len(times) // 2]


def evaluate(model: nn.Module, sub: SubModel | None, calib: list[torch.Tensor], test: Iterable,
             device: torch.device, amp: torch.dtype | None) -> float:
    """Recalibrate ``sub``'s BatchNorm on ``calib`` (when it has BatchNorm) and return its accuracy."""
    if calib:
        with autocast(device, amp):
            recalibrate(model, sub, calib)
    return accuracy(model, sub, test, device, amp)
