"""The training loop and evaluation: plain PyTorch.

One optimizer step: the sampler names the sub-models; each runs forward and backward on the same
batch with its loss divided by their number (gradients accumulate in the shared weights); then one
optimizer step and one LR-schedule step. Sub-models that are exits of one stack and differ only in
depth share one trunk pass (``trunk_groups``/``run_exits``): SoFT's every-exit loss costs one forward
and one backward. With distillation, the soft target of the others is the largest sub-model's
(detached) output, or a frozen copy of the starting model's (``distill.teacher=initial``), which can
also anchor the full model itself (``distill.anchor``). How a batch becomes inputs, a loss and a
metric is the data's :class:`~sortedcli.tasks.Task`; nothing here knows the architecture.

Data order is a seeded permutation per epoch and the step is the only position, so a run resumed
from a checkpoint sees exactly the batches, sub-models and random draws it would have seen.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler as IndexSampler

from .distributed import Dist
from .nest import (SubModel, batchnorm_kept, call, has_batchnorm, has_exits, nesting, read_exit, recalibrate,
                   run_exits, trunk_groups, use)
from .sampling import Sampler
from .tasks import Task


# --- device and precision ------------------------------------------------------------------------

def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} asked for, but no CUDA GPU is available (use trainer.device=auto)")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 (a CUDA GPU from Ampere on; the CPU does, slowly)."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def autocast_dtype(device: torch.device, precision: str = "auto", bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype (None: fp32) for ``precision``: ``auto`` is bf16 on a GPU that supports it
    (``bf16``, default: asked of the device) and fp32 otherwise (on the CPU, and on a GPU without bf16,
    where fp16 would need loss scaling); ``bf16`` on a GPU without it is refused."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if bf16 is None:
        bf16 = bf16_supported(device)
    if bf16:
        return torch.bfloat16
    if precision == "bf16":
        raise ValueError("trainer.precision=bf16, but this GPU has no bf16 support: pass trainer.precision=fp32 "
                         "(or auto, which falls back to fp32)")
    return None


def precision_label(device: torch.device, precision: str, amp: torch.dtype | None) -> str:
    """What training computes in, and why, for the run's header."""
    if amp is not None:
        return f"{str(amp).removeprefix('torch.')} autocast"
    if precision == "auto" and device.type == "cuda":
        return "fp32 (this GPU has no bf16)"
    return "fp32"


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# --- data order ----------------------------------------------------------------------------------

class EpochBatches(IndexSampler):
    """Batches of indices of one epoch: a permutation seeded by ``(seed, epoch)``, full batches only,
    starting at batch ``start`` (to resume mid-epoch).

    With ``world`` data-parallel processes, ``batch_size`` is the global batch and rank ``rank`` gets
    its ``batch_size / world`` slice of each: the global batches do not depend on the number of
    processes, so a run resumed (or re-run) with another number sees the same data."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world: int = 1):
        if batch_size % world:
            raise ValueError(f"the batch size ({batch_size}) must be a multiple of the number of processes "
                             f"({world}): each takes an equal slice of every batch")
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return self.n // self.batch_size - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        part = self.batch_size // self.world
        for b in range(self.start, self.n // self.batch_size):
            first = b * self.batch_size + self.rank * part
            yield order[first:first + part]


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, start: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, collate: Callable | None = None,
                 dist: Dist = Dist()) -> DataLoader:
    # The loader gets its own generator so that creating it never draws from the global RNG.
    batches = EpochBatches(len(dataset), batch_size, seed, epoch, start, dist.rank, dist.world)
    return DataLoader(dataset, batch_sampler=batches,
                      num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed + epoch))


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    return len(dataset) // batch_size


# --- one optimizer step --------------------------------------------------------------------------

#: where distillation's soft targets come from (``distill.teacher``)
TEACHERS = ("self", "initial")


@dataclass
class Distill:
    """Distillation (off unless ``enabled``): every sub-model but the largest scores ``alpha`` x
    KL(teacher || it) at temperature T (times T^2) + (1 - alpha) x its cross-entropy, at the places
    that count. The teacher is ``self``, the largest sub-model of the same step, detached (in-place
    distillation), or ``initial``, ``model``: a frozen copy of the starting weights
    (:func:`frozen_copy`). ``anchor`` > 0 (``initial`` only) adds anchor x KL(teacher || largest) to
    the largest's own loss, so that training changes what the full model says as little as it can;
    ``anchor_only`` drops the largest's cross-entropy, so that only the anchor trains it (with
    ``alpha=1`` no sub-model learns from the labels: the data's answers only say which places count)."""

    enabled: bool = False
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the KL term for the smaller sub-models; 1 - alpha on the labels
    teacher: str = "self"
    anchor: float = 0.0
    anchor_only: bool = False  # the largest learns anchor x KL(teacher || it) alone, no cross-entropy
    model: nn.Module | None = field(default=None, repr=False)  # the frozen teacher of teacher=initial

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"distill.teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.anchor < 0 or (self.anchor and self.teacher != "initial"):
            raise ValueError(f"distill.anchor={self.anchor} needs distill.teacher=initial and a value >= 0")
        if self.anchor_only and not self.anchor:
            raise ValueError("distill.anchor_only needs distill.anchor > 0 (else the full model learns nothing)")
        if self.enabled and self.teacher == "initial" and self.model is None:
            raise ValueError("distill.teacher=initial needs the frozen starting model (Distill.model)")

    @property
    def frozen(self) -> nn.Module | None:
        """The frozen teacher when distillation is on and learns from it, else None."""
        return self.model if self.enabled and self.teacher == "initial" else None


def frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` that never trains: eval mode (no dropout, BatchNorm's running statistics), no
    gradients, its floating-point weights in ``dtype`` when given (bf16 when the run computes in bf16)."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    return teacher.to(dtype) if dtype is not None else teacher


@dataclass
class Reference:
    """A teacher for a chunked readout (:func:`exit_losses`): its hidden states at the counted places
    (``N x hidden``, no gradient) and the model, as the sub-model ``sub``, that reads them out."""

    model: nn.Module
    sub: SubModel | None
    states: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module, sub: SubModel | None, inputs, at: torch.Tensor) -> "Reference":
        nest = nesting(model)
        depth = (sub.get(nest.scope.depth_dim) if sub is not None else None) or nest.depth
        with _selected(model, sub):
            return cls(model, sub, exit_states(model, inputs, [depth], at)[depth].detach())

    @torch.no_grad()
    def logits(self, start: int, stop: int) -> torch.Tensor:
        with _selected(self.model, self.sub):
            return nesting(self.model).readout(self.model, self.states[start:stop])


def train_step(model: nn.Module, task: Task, subs: list[SubModel], batch, optimizer: torch.optim.Optimizer,
               largest: SubModel, distill: Distill, device: torch.device, amp: torch.dtype | None,
               observe: Callable[[list[SubModel], list[float]], None] | None = None,
               dist: Dist = Dist(), accumulate: int = 1, clip_grad_norm: float | None = None,
               stats: dict | None = None) -> float:
    """Forward/backward every sub-model of ``subs`` on ``batch`` (already on the device), accumulate,
    one optimizer step. Returns the mean loss; ``observe(subs, losses)`` (e.g. ``Sampler.observe``)
    is told each sub-model's label loss (cross-entropy, before any distillation mix).

    ``accumulate=N`` runs ``batch`` as N micro-batches one after another (activations of one at a time),
    gradients accumulating. Data-parallel (``dist``): ``batch`` is this rank's slice; the accumulated
    gradients are averaged over the ranks once, before the step, and the losses too, so every rank's
    sampler observes the same values and draws the same sub-models next. Either way each piece's loss
    (a mean over its own counted targets: tokens, images) is weighted by its share of the whole batch's
    count, so the step is the one of a single pass over the global batch.

    ``clip_grad_norm=C`` (None or 0: off) scales the gradients so that their global L2 norm is at most
    C, after the accumulation and the averaging over the ranks and before the step (:func:`clip_gradients`);
    the norm before clipping goes into ``stats["grad_norm"]`` when ``stats`` is given.

    Backward runs inside the sub-model's scope (``use``), so that a layer whose activations are
    checkpointed (:func:`checkpoint_activations`) is recomputed as the same sub-model."""
    optimizer.zero_grad(set_to_none=True)
    micro = task.split(batch, accumulate) if accumulate > 1 else [batch]
    shares = [1.0] * len(micro)
    if dist.enabled or len(micro) > 1:
        counted = torch.stack([task.counted(m) for m in micro]).float()
        shares = list(counted * (dist.world * len(micro)) / dist.sum(counted.sum()).clamp_min(1))
    groups = trunk_groups(model, subs)
    if distill.enabled:
        groups.sort(key=lambda g: largest not in g[1])  # the teacher runs first when it is sampled
    frozen = distill.frozen  # teacher=initial: the starting model, else the same step's largest
    total = torch.zeros((), device=device)
    order, parts = [], []  # each sub-model's detached label loss, gathered for one host sync

    def note(i: int, sub: SubModel, one: torch.Tensor) -> None:  # the i-th loss of a piece: add it up
        if len(order) < len(subs):
            order.append(sub)
            parts.append(one.detach().float() / len(micro))
        else:
            parts[i] = parts[i] + one.detach().float() / len(micro)

    for piece, share in zip(micro, shares):
        inputs, keep = task.inputs(piece), task.keep(piece)
        # every member's head at the counted places only, chunk by chunk (back-propagated inside
        # exit_losses): no logits of a place that does not count, none N x V at once. FSDP2 shards
        # (whose hooks expect whole forward passes) keep the logits path below.
        chunked = keep is not None and not dist.sharded and has_exits(model)
        teacher = None  # chunked: a Reference (hidden states at the counted places); else the logits
        if distill.enabled and (frozen is not None or not any(largest in members for _, members in groups)):
            source, sub = (frozen, None) if frozen is not None else (model, largest)
            with torch.no_grad(), autocast(device, amp):
                if chunked:
                    teacher = Reference.of(source, sub, inputs, keep)
                else:
                    with _selected(source, sub):
                        teacher = call(source, inputs).detach()
        i = 0
        for trunk, members in groups:
            with use(model, trunk):
                if chunked:
                    with autocast(device, amp):
                        ones, labels, top = exit_losses(
                            model, task, piece, inputs, keep, trunk, members, share / (len(subs) * len(micro)),
                            distill=distill if distill.enabled else None, teacher=teacher, largest=largest)
                    if distill.enabled and teacher is None and largest in members:  # the other trunks' teacher
                        teacher = Reference(model, largest, top)
                    for sub, one, label in zip(members, ones, labels):
                        note(i, sub, label * share)
                        i += 1
                        total += one * share / len(micro)
                    continue
                with autocast(device, amp):
                    logits = forward_members(model, inputs, trunk, members, keep)
                    if distill.enabled and teacher is None and largest in members:
                        teacher = logits[largest].detach()
                    loss = torch.zeros((), device=device)
                    for sub in members:
                        one = task.loss(logits[sub], piece) * share
                        note(i, sub, one)
                        i += 1
                        if teacher is not None and sub != largest:
                            kd = task.distill(logits[sub], teacher, piece, distill.temperature) * share
                            one = distill.alpha * kd + (1 - distill.alpha) * one
                        elif teacher is not None and distill.anchor:  # the largest, held to the frozen teacher
                            held = distill.anchor * task.distill(logits[sub], teacher, piece,
                                                                 distill.temperature) * share
                            one = held if distill.anchor_only else one + held
                        loss = loss + one
                if loss.requires_grad:  # not when nothing it depends on trains (a frozen trunk's full model)
                    (loss / (len(subs) * len(micro))).backward()
            total += loss.detach() / len(micro)
    dist.average_gradients(model)
    if clip_grad_norm:
        norm = clip_gradients(model, clip_grad_norm)
        if stats is not None:
            stats["grad_norm"] = norm
    optimizer.step()
    if observe is None:
        return dist.mean(total).item() / len(subs)  # one host sync per step, not one per sub-model
    values = dist.mean(torch.stack([total.float(), *parts])).tolist()  # still one host sync
    observe(order, values[1:])
    return values[0] / len(subs)


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Scale the gradients of ``model`` so that their global L2 norm (over every parameter that has one)
    is at most ``max_norm``; returns the norm before clipping (the same on every rank).

    Replicated (one process, or the ranks after :meth:`Dist.average_gradients`): every rank holds the
    same averaged gradients and computes the same norm. Sharded (FSDP2): each gradient is a ``DTensor``
    shard; torch's ``clip_grad_norm_`` computes each shard's norm, the sum of their squares is reduced
    over the ranks (a partial ``DTensor``, made whole by ``full_tensor()``), and each rank scales its
    own shards by the same factor."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor (sharded gradients): the global norm, on every rank
        norm = norm.full_tensor()
    return float(norm)


def checkpoint_activations(model: nn.Module) -> int:
    """Activation checkpointing per depth unit (a transformer layer, a residual block): each unit keeps
    only its inputs in the forward pass and recomputes its activations in the backward pass. Returns
    the number of depth units.

    A model that offers its own per-layer checkpointing (``activation_checkpointing_enable``: every
    transformers model, whose layers are the depth units) uses it, non-reentrant: it also stops the
    forward pass from filling a KV cache, which a recomputation would append to a second time. Any
    other model gets torch's composable ``checkpoint`` on each depth unit (hooks on the module:
    parameter names, ``state_dict`` keys and FSDP2's ``fully_shard`` are unchanged). Either way the
    recomputation runs under the autocast of the forward pass and the sub-model active during the
    backward pass (``train_step`` runs it inside ``use``), with the random state (dropout) replayed.
    BatchNorm in a checkpointed block updates its running statistics twice per step (sortednet
    recalibrates them before every evaluation)."""
    from torch.distributed._composable import checkpoint

    from .nest import nesting

    units = nesting(model).units
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        for unit in units:
            checkpoint(unit.module)
    return len(units)


#: places whose logits one head readout computes at once in training (:func:`exit_losses`): 1024 x a
#: 49k vocabulary is 200 MB of float32 logits, where a batch's every place would be gigabytes
HEAD_CHUNK = 1024


class _Reached(Exception):
    """Raised by :func:`exit_states`' hook once the deepest hidden state is caught: the rest of the
    forward pass (the final norm and the head at every place) is not needed."""


def exit_states(model: nn.Module, inputs, depths: list[int], at: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{k: hidden state after depth unit k-1, at the places at marks}`` (rows in row-major order) for
    every exit ``k`` in ``depths``, from one forward pass of the active sub-model (whose depth is the
    deepest of them), stopped right after its deepest unit: no head runs at all."""
    units, deepest, caught = nesting(model).units, max(depths), {}

    def catch(k):
        def hook(module, args, out):
            caught[k] = (out[0] if isinstance(out, tuple) else out)[at]
            if k == deepest:
                raise _Reached
        return hook

    hooks = [units[k - 1].module.register_forward_hook(catch(k)) for k in set(depths)]
    try:
        call(model, inputs)
    except _Reached:
        pass
    finally:
        for h in hooks:
            h.remove()
    return caught


def exit_losses(model: nn.Module, task: Task, batch, inputs, keep: torch.Tensor, trunk: SubModel,
                members: list[SubModel], scale: float, chunk: int | None = None, distill: Distill | None = None,
                teacher: Reference | None = None,
                largest: SubModel | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Back-propagate ``scale`` x the sum of the members' losses (exits of the active ``trunk``) and
    return ``(losses, labels, top)``: each member's loss and its cross-entropy alone (detached; the same
    without ``distill``), and the trunk's deepest hidden states at ``keep`` (detached). The trunk runs
    once to its deepest exit (:func:`exit_states`, the hidden states gathered at ``keep``, the places
    whose loss counts); each exit's readout (the model's own norm and head) runs on ``chunk`` places at
    a time (:data:`HEAD_CHUNK`) and is back-propagated at once, into the head's weights and a leaf copy
    of the hidden state; then one backward pass takes the leaves' gradients through the trunk. So no
    readout holds more than ``chunk`` x vocabulary logits, and none is recomputed: the loss and
    gradients are those of the whole readout at once (sums in another order).

    With ``distill`` (enabled), each chunk's teacher logits are computed once: ``teacher``'s (a frozen
    starting model's, or the full model's read in another trunk) or, when ``largest`` is a member, its
    own logits, detached (it is read out first). Every other member scores ``alpha`` x KL(teacher ||
    it) x T^2 + (1 - alpha) x its cross-entropy; ``largest`` scores its cross-entropy, + ``anchor`` x
    KL(teacher || it) x T^2 against a frozen teacher. The KL is summed chunk by chunk, as the
    cross-entropy is: no positions x vocabulary logits of the teacher either."""
    nest = nesting(model)
    top = trunk.get(nest.scope.depth_dim) or nest.depth
    depths = [m.get(nest.scope.depth_dim) or top for m in members]
    states = exit_states(model, inputs, depths, keep)
    targets, count = task.kept_targets(batch), task.counted(batch)
    # (a frozen trunk's states need no gradient: a readout whose own weights do not train either, such as
    # the full model's there, is then not back-propagated at all)
    leaves = {k: h.detach().requires_grad_(h.requires_grad) for k, h in states.items()}
    chunk = chunk or HEAD_CHUNK
    losses = [torch.zeros((), device=targets.device) for _ in members]
    labels = [torch.zeros((), device=targets.device) for _ in members]
    first = sorted(range(len(members)), key=lambda j: members[j] != largest)  # the in-place teacher first
    for s in range(0, len(targets), chunk):
        t = targets[s:s + chunk]
        ref = teacher.logits(s, s + chunk) if distill is not None and teacher is not None else None
        for j in first if distill is not None else range(len(members)):
            z = read_exit(model, leaves[depths[j]][s:s + chunk], depths[j])
            label = task.loss_sum(z, t) / count
            part = label
            if distill is not None and members[j] == largest:
                if ref is None:
                    ref = z.detach()  # in-place distillation: the full model's logits teach this chunk
                elif distill.anchor:
                    held = distill.anchor * task.distill_sum(z, ref, t, distill.temperature) / count
                    part = held if distill.anchor_only else part + held
            elif distill is not None:
                kd = task.distill_sum(z, ref, t, distill.temperature) / count
                part = distill.alpha * kd + (1 - distill.alpha) * label
            if part.requires_grad:
                (part * scale).backward()
            losses[j] = losses[j] + part.detach()
            labels[j] = labels[j] + label.detach()
    # (a frozen trunk, model.exits.trunk=frozen: only the readouts train, and nothing goes back through it)
    done = [(states[k], leaves[k].grad) for k in states if leaves[k].grad is not None and states[k].requires_grad]
    if done:
        torch.autograd.backward([h for h, _ in done], [g for _, g in done])
    return losses, labels, states[max(states)].detach()


def forward_members(model: nn.Module, inputs, trunk: SubModel, members: list[SubModel],
                    keep: torch.Tensor | None = None) -> dict:
    """``{sub: logits}`` for the members of one trunk (the active sub-model is ``trunk``); several exits
    are read out only where ``keep`` (the task's mask of the logits that count) says."""
    if all(m == trunk for m in members):
        return {trunk: call(model, inputs)}
    depth_dim = model.sortednet.scope.depth_dim
    by_depth = run_exits(model, inputs, [m[depth_dim] for m in members], at=keep)
    return {m: by_depth[m[depth_dim]] for m in members}


# --- the loop ------------------------------------------------------------------------------------

class NonFiniteLoss(ArithmeticError):
    """The loss of optimizer step ``step`` is NaN or infinite (the step's update is already applied)."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"the loss of step {step} is {loss}")
        self.step, self.loss = step, loss


@dataclass
class Progress:
    """Where a run is: restored from and saved to checkpoints."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already done
    seconds: float = 0.0  # training time so far (the steps' wall time, over resumes): trainer.max_minutes


def fit(model: nn.Module, task: Task, sampler: Sampler, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, dataset: Dataset, *, epochs: int,
        batch_size: int, seed: int, device: torch.device, amp: torch.dtype | None,
        distill: Distill, progress: Progress, max_steps: int | None = None, num_workers: int = 0,
        collate: Callable | None = None, dist: Dist = Dist(), accumulate: int = 1, steps: int | None = None,
        clip_grad_norm: float | None = None, stats: dict | None = None, stop: Callable[[], bool] | None = None,
        on_step: Callable[[Progress, float], None] = lambda p, loss: None,
        on_epoch_end: Callable[[Progress], None] = lambda p: None) -> Progress:
    """Train from ``progress`` to the end of ``epochs``, or of ``steps`` optimizer steps when given (the
    run's length instead of ``epochs``: as many epochs as it takes, the last one partial), stopping
    earlier at ``max_steps``; with ``dist``, as one of its data-parallel processes (``batch_size`` is the
    global batch of a step, run as ``accumulate`` micro-batches per process). A run that ends inside an
    epoch (``steps``) calls ``on_epoch_end`` there, its position left mid-epoch (a longer ``steps``
    resumes the same data order). A NaN or infinite loss raises :class:`NonFiniteLoss` before
    ``on_step`` sees that step (so no checkpoint is written from it). ``clip_grad_norm`` and ``stats``:
    see :func:`train_step` (``stats`` holds the last step's values when ``on_step`` is called). ``stop``,
    asked before each step (every rank must give the same answer), ends training there like ``max_steps``."""
    largest = sampler.grid.largest
    per_epoch = steps_per_epoch(dataset, batch_size)
    if per_epoch == 0:
        raise ValueError(f"the training set ({len(dataset)} items) is smaller than one batch ({batch_size})")
    length = per_epoch * epochs if steps is None else steps
    if steps is not None:
        epochs = math.ceil(steps / per_epoch)
    sampler.start(length)  # the schedule's length, as the LR schedule's (not max_steps)
    while progress.epoch < epochs and (steps is None or progress.step < steps):
        model.train()  # (an epoch-end evaluation leaves it in eval mode)
        loader = epoch_loader(dataset, batch_size, seed, progress.epoch, progress.batch, num_workers,
                              pin_memory=device.type == "cuda", collate=collate, dist=dist)
        for batch in loader:
            if (max_steps is not None and progress.step >= max_steps) or (stop is not None and stop()):
                return progress
            batch = task.to_device(batch, device)
            loss = train_step(model, task, sampler.step(), batch, optimizer, largest, distill, device, amp,
                              observe=sampler.observe, dist=dist, accumulate=accumulate,
                              clip_grad_norm=clip_grad_norm, stats=stats)
            if not math.isfinite(loss):  # a float already on the host, the mean over the ranks: they all agree
                raise NonFiniteLoss(progress.step + 1, loss)
            scheduler.step()
            progress.step += 1
            progress.batch += 1
            on_step(progress, loss)
            if steps is not None and progress.step >= steps and progress.batch < per_epoch:  # ends mid-epoch
                on_epoch_end(progress)
                return progress
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

def calibration_batches(model: nn.Module, task: Task, dataset: Dataset, batch_size: int, num_batches: int,
                        seed: int, device: torch.device, collate: Callable | None = None) -> list:
    """A fixed random sample of training inputs (no augmentation) kept on the device, reused to
    recalibrate every sub-model's BatchNorm; none when ``model`` has no BatchNorm."""
    if not has_batchnorm(model):
        return []
    n = min(num_batches, max(1, len(dataset) // batch_size))
    size = min(batch_size, len(dataset))
    loader = epoch_loader(dataset, size, seed, epoch=10**6, collate=collate)
    return [task.inputs(task.to_device(batch, device)) for batch in itertools.islice(loader, n)]


@torch.no_grad()
def score(model: nn.Module, task: Task, sub: SubModel | None, loader: Iterable, device: torch.device,
          amp: torch.dtype | None, dist: Dist = Dist()) -> float:
    """The task's metric (accuracy, F1, perplexity) of ``sub`` (eval mode) over ``loader`` (with
    ``dist``: over every rank's ``loader``, each rank holding a part of the test set). A plain model
    (a sub-model cut out by :func:`~sortedcli.nest.extract`, ``sub=None``) is scored as it is."""
    model.eval()
    sums = None
    with _selected(model, sub), autocast(device, amp):
        for batch in loader:
            batch = task.to_device(batch, device)
            part = task.sums(call(model, task.inputs(batch)), batch)
            sums = part if sums is None else sums + part
    if dist.enabled:  # a rank with no test batch (more ranks than batches) still takes part
        sums = dist.sum(sums if sums is not None else torch.zeros(task.sums_size, device=device))
    if sums is None:
        raise ValueError("nothing to evaluate: the test set is empty")
    return task.finish(sums)  # one host sync per sub-model, not per batch


def _selected(model: nn.Module, sub: SubModel | None):
    """``use(model, sub)`` for a sorted model; nothing to select in a plain one (``sub`` None)."""
    if sub is None and not hasattr(model, "sortednet"):
        return contextlib.nullcontext(model)
    return use(model, sub)


@torch.no_grad()
def score_members(model: nn.Module, task: Task, trunk: SubModel, members: list[SubModel], loader: Iterable,
                  device: torch.device, amp: torch.dtype | None) -> dict[SubModel, float]:
    """:func:`score` of every member of one trunk (:func:`~sortedcli.nest.trunk_groups`) from one
    pass over ``loader``: exits of one stack are read out of the trunk's pass at the positions the
    task counts (a 30-layer LM's 10 exits cost one forward, not 10 of 3..30 layers). No BatchNorm
    recalibration: for models with exits (transformers)."""
    model.eval()
    sums: dict[SubModel, torch.Tensor] = {}
    with use(model, trunk), autocast(device, amp):
        for batch in loader:
            batch = task.to_device(batch, device)
            logits = forward_members(model, task.inputs(batch), trunk, members, task.keep(batch))
            for sub in members:
                part = task.sums(logits.pop(sub), batch)
                sums[sub] = part if sub not in sums else sums[sub] + part
    if not sums:
        raise ValueError("nothing to evaluate: the test set is empty")
    return {sub: task.finish(v) for sub, v in sums.items()}


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


def evaluate(model: nn.Module, task: Task, sub: SubModel | None, calib: list, test: Iterable,
             device: torch.device, amp: torch.dtype | None, dist: Dist = Dist(),
             keep_batchnorm: bool = False) -> float:
    """Recalibrate ``sub``'s BatchNorm on ``calib`` (when it has BatchNorm; locally, on each rank) and
    return its metric (over every rank's ``test`` with ``dist``).

    ``keep_batchnorm=True`` (a model being trained: the epoch-end evaluation) puts the BatchNorm
    statistics and the modules' train/eval modes back as they were afterwards
    (:func:`~sortedcli.nest.batchnorm_kept`): the next checkpoint holds the training statistics, not
    those of the sub-model evaluated last."""
    if keep_batchnorm:
        with batchnorm_kept(model):
            return evaluate(model, task, sub, calib, test, device, amp, dist)
    if calib:
        with autocast(device, amp):
            recalibrate(model, sub, calib)
    return score(model, task, sub, test, device, amp, dist)
