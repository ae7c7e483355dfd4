"""The task contract: how a batch becomes model inputs, a loss and a metric.

The engine, ``eval``, ``export`` and FLOP counting never look at the architecture; what differs
between image classification, text classification and language modelling is this small contract,
chosen by the data (``data=fashion_mnist`` gives :class:`ImageClassification`, ``data=glue``
:class:`TextClassification`). A task:

- moves a batch to the device and splits it into what the model is called with (``inputs``: a tensor,
  or a mapping of keyword arguments) and what it is scored against;
- turns the model's logits and the batch into ``(logits, targets)`` pairs, flattened, with ``-100``
  marking positions that do not count (padding, prompt tokens): cross-entropy, distillation and the
  metric all read these pairs;
- accumulates its metric as a small tensor of sums over batches (one host sync per evaluation) and
  turns the sums into the number people compare (``accuracy``, ``f1``, ``perplexity``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

IGNORE = -100  # targets that do not count (as torch's cross_entropy ignore_index)


def move(inputs, device: torch.device):
    """Model inputs (a tensor, or a dict of them) on ``device``."""
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device)


class Task(ABC):
    name = "task"
    metric = "accuracy"
    higher_is_better = True

    # --- batches ---------------------------------------------------------------------------------
    unit = "sample"  # what one FLOPs figure is counted per

    @abstractmethod
    def to_device(self, batch, device: torch.device):
        """The batch with its tensors on ``device``."""

    @abstractmethod
    def inputs(self, batch):
        """What the model is called with: a tensor, or a mapping of keyword arguments."""

    @abstractmethod
    def targets(self, batch) -> torch.Tensor:
        """What the logits are scored against."""

    def pairs(self, logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits N x C, targets N)`` of the positions that count (targets may hold IGNORE)."""
        return logits, self.targets(batch)

    def keep(self, batch) -> torch.Tensor | None:
        """Where the model's logits count, as a boolean mask over their leading dimensions, or None
        (all of them do). With a mask, the engine reads several exits out at those places only
        (``run_exits(..., at=mask)``) and hands ``pairs`` the gathered ``N x C`` logits."""
        return None

    def check_input(self, dataset, collate=None, n: int = 8):
        """Model inputs of a few ``dataset`` items, on which an export is checked to reproduce the
        sub-model it was cut from (the FLOPs example is one input: too little to catch a wrong layer)."""
        from torch.utils.data import default_collate

        items = [dataset[i] for i in range(min(n, len(dataset)))]
        return self.inputs((collate or default_collate)(items))

    # --- training --------------------------------------------------------------------------------
    def split(self, batch, n: int) -> list:
        """``batch`` as ``n`` equal micro-batches (gradient accumulation); its size must divide by ``n``."""
        if isinstance(batch, dict):
            chunks = {k: v.chunk(n) for k, v in batch.items()}
            return [{k: c[i] for k, c in chunks.items()} for i in range(n)]
        chunks = [v.chunk(n) for v in batch]
        return [type(batch)(c[i] for c in chunks) for i in range(n)]

    def counted(self, batch) -> torch.Tensor:
        """How many targets of ``batch`` count: the loss is their mean (data-parallel ranks weight their
        losses by it, so that a step equals one process's step on the global batch)."""
        return (self.targets(batch) != IGNORE).sum()

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        z, t = self.pairs(logits, batch)
        return F.cross_entropy(z.float(), t, ignore_index=IGNORE)

    def kept_targets(self, batch) -> torch.Tensor:
        """The targets of the places ``keep(batch)`` marks, in the same (row-major) order as logits
        gathered there: what a loss computed from gathered hidden states, chunk by chunk, scores."""
        return self.targets(batch)[self.keep(batch)]

    def loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed loss of ``logits`` (N x C) against ``targets`` (N): :meth:`loss` is the sum over
        every chunk of positions divided by :meth:`counted`."""
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")

    def distill(self, student: torch.Tensor, teacher: torch.Tensor, batch, temperature: float) -> torch.Tensor:
        """KL(teacher || student) at temperature T over the positions that count, times T^2 so its
        gradients match cross-entropy's magnitude (the fix for distillation losses orders of magnitude
        below the CE)."""
        s, t = self.pairs(student, batch)
        q, tq = self.pairs(teacher, batch)  # either may be gathered at keep(batch) already
        s, q, T = s[t != IGNORE].float(), q[tq != IGNORE].float(), temperature
        return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(q / T, -1), reduction="batchmean",
                        log_target=True) * T * T

    def distill_sum(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                    temperature: float) -> torch.Tensor:
        """The summed KL(teacher || student) x T^2 of rows (``N x C`` logits of the same places, e.g. one
        chunk of the places ``keep(batch)`` marks) whose ``targets`` count: :meth:`distill` is the sum
        over every chunk of places divided by :meth:`counted`. The teacher carries no gradient."""
        T = temperature
        rows = F.kl_div(F.log_softmax(student.float() / T, -1), F.log_softmax(teacher.detach().float() / T, -1),
                        reduction="none", log_target=True).sum(-1)
        return rows.masked_fill(targets == IGNORE, 0).sum() * T * T

    # --- metric ----------------------------------------------------------------------------------
    def sums(self, logits: torch.Tensor, batch) -> torch.Tensor:
        """This batch's contribution to the metric (summed over batches)."""
        z, t = self.pairs(logits, batch)
        keep = t != IGNORE
        correct = (z.argmax(-1) == t)[keep].sum()
        return torch.stack([correct.float(), keep.sum().float()])

    def agreement(self, logits: torch.Tensor, reference: torch.Tensor, batch) -> torch.Tensor:
        """``[positions where logits' argmax equals reference's, positions]`` over the positions that
        count: how often a sub-model (an exit) predicts what the full model predicts."""
        z, t = self.pairs(logits, batch)
        r, _ = self.pairs(reference, batch)
        keep = t != IGNORE
        return torch.stack([(z.argmax(-1) == r.argmax(-1))[keep].sum(), keep.sum()])

    #: the length of ``sums(...)``: a rank that got no test batch contributes zeros of this size
    sums_size = 2

    def finish(self, sums: torch.Tensor) -> float:
        correct, total = sums.tolist()
        return 100.0 * correct / max(1.0, total)


class ImageClassification(Task):
    """Batches ``(images, labels)``; top-1 accuracy in percent."""

    name = "image_classification"
    unit = "image"

    def to_device(self, batch, device):
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def inputs(self, batch):
        return batch[0]

    def targets(self, batch):
        return batch[1]


class KeywordBatches(Task):
    """Batches are dicts of padded tensors (``input_ids``, ``attention_mask``, ...) plus ``labels``;
    the model is called with everything but the labels."""

    def to_device(self, batch, device):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def inputs(self, batch):
        return {k: v for k, v in batch.items() if k != "labels"}

    def targets(self, batch):
        return batch["labels"]

    def check_input(self, dataset, collate=None, n: int = 4):
        """A few sequences cut to different lengths and padded to the longest: several tokens per
        sequence (over one token, attention is 1 whatever the queries and keys) and attention-mask
        zeros, so that a wrong q/k/v projection or mask handling shows in the logits."""
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        items = items * (2 if len(items) == 1 else 1)  # a second sequence to pad
        cut = []
        for i, item in enumerate(items):
            length = len(item["input_ids"])
            keep = max(2, length - i * max(1, length // (2 * len(items))))
            cut.append({k: v[:keep] if k != "labels" or _sized(v, length) else v for k, v in item.items()})
        return self.inputs(collate(cut))


def _sized(value, length: int) -> bool:
    """Whether ``value`` is a per-token sequence of ``length`` (not one label per sequence)."""
    try:
        return len(value) == length
    except TypeError:
        return False


class TextClassification(KeywordBatches):
    """Token batches with one label per sequence. Metric ``accuracy`` (percent) or ``f1``
    (binary F1 of class 1, in percent, as GLUE reports it for MRPC and QQP)."""

    name = "text_classification"
    unit = "sequence"

    def __init__(self, metric: str = "accuracy"):
        if metric not in ("accuracy", "f1"):
            raise ValueError(f"text classification metric must be accuracy or f1, got {metric!r}")
        self.metric = metric
        self.sums_size = 2 if metric == "accuracy" else 3

    def sums(self, logits, batch):
        if self.metric == "accuracy":
            return super().sums(logits, batch)
        pred, t = logits.argmax(-1), batch["labels"]
        tp = ((pred == 1) & (t == 1)).sum()
        fp = ((pred == 1) & (t != 1)).sum()
        fn = ((pred != 1) & (t == 1)).sum()
        return torch.stack([tp, fp, fn]).float()

    def finish(self, sums):
        if self.metric == "accuracy":
            return super().finish(sums)
        tp, fp, fn = sums.tolist()
        return 100.0 * 2 * tp / max(1.0, 2 * tp + fp + fn)


class CausalLM(KeywordBatches):
    """Batches are dicts with ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding and,
    for instructions, on the prompt); position t predicts token t+1. Metric: perplexity over the
    positions that count (lower is better)."""

    name = "causal_lm"
    metric = "perplexity"
    higher_is_better = False
    unit = "token"

    def pairs(self, logits, batch):
        labels = batch["labels"][:, 1:]
        if logits.dim() == 2:  # gathered at keep(batch): the positions whose next token counts
            return logits, labels[labels != IGNORE]
        z = logits[:, :-1]
        return z.reshape(-1, z.shape[-1]), labels.reshape(-1)

    def keep(self, batch):
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE
        return keep

    def counted(self, batch):
        return (batch["labels"][:, 1:] != IGNORE).sum()

    def kept_targets(self, batch):
        labels = batch["labels"][:, 1:]
        return labels[labels != IGNORE]  # the order of keep(batch)'s places: row-major, shifted by one

    def sums(self, logits, batch):
        z, t = self.pairs(logits, batch)
        nll = F.cross_entropy(z.float(), t, ignore_index=IGNORE, reduction="sum")
        return torch.stack([nll, (t != IGNORE).sum().float()])

    def finish(self, sums):
        nll, n = sums.tolist()
        return math.exp(min(nll / max(1.0, n), 50.0))


TASKS = {cls.name: cls for cls in (ImageClassification, TextClassification, CausalLM)}
