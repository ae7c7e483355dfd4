"""``sortednet plan``: the GPU memory a ``train`` run needs per rank, read before renting GPUs.

It takes what ``train`` takes (``--recipe NAME``, ``key=value`` overrides such as ``trainer.devices=8``
``trainer.strategy=fsdp``), builds the model on PyTorch's ``meta`` device (shapes, no storage: a
13B LLaMA in seconds, no weights read, offline), and prints per rank:

With ``P`` the parameters (numel; ``T`` of them train: all, but the adapters only with ``model.lora``),
``N`` the ranks (``trainer.devices``), ``s = N`` under ``trainer.strategy=fsdp`` with ``N > 1`` and
``s = 1`` otherwise (FSDP2 shards parameters, gradients and optimizer state; DDP replicates them), ``c``
the bytes of the compute dtype (2 for bf16, 4 for fp32):

- **parameters** ``4 P / s``: fp32 master weights (what ``train`` keeps, also with bf16 autocast);
- **gradients** ``4 T / s``: fp32, the parameters' dtype;
- **optimizer state** ``k x 4 T / s``: ``k = 2`` for AdamW (exp_avg, exp_avg_sq), ``k = 1`` for SGD with
  momentum, 0 without;
- **working copies**: with bf16 autocast and no FSDP, the bf16 copy of every weight that the
  forward pass casts and keeps for the backward pass, ``2 P``; with FSDP, the parameters gathered at
  once (the largest depth unit twice, itself and the next one prefetched, plus the root's own
  parameters: embeddings, final norm, head) in the compute dtype, plus the largest unit's fp32
  gradient before it is reduce-scattered;
- **activations** at the micro-batch ``b = trainer.batch_size / (N x trainer.accumulate)`` and sequence
  length ``T`` (``data.max_length``; images: the data's image size): measured, not modelled, by
  running the forward pass of the largest sub-model on the meta device in the compute dtype and
  adding up the bytes of every tensor autograd saves for the backward pass (each storage once,
  parameters excluded), attributed to the depth unit that saved it or to the rest of the model
  (embeddings, head, loss). The loss is a cross-entropy over the logits (its fp32 log-softmax
  counts; an upper bound where training reads the head out a chunk of positions at a time). Exits
  (SoFT: every exit's loss from one trunk pass) add the hidden state each extra exit keeps for its
  readout, at every position (an upper bound: training gathers the counted positions only); their
  readouts run one chunk at a time and are back-propagated at once, so they never add up. Without checkpointing:
  ``A = sum_k A_k + A_rest``; with ``trainer.activation_checkpointing``:
  ``A_ckpt = sum_k I_k + A_rest + max_k A_k``, where ``I_k`` are the bytes of the inputs unit ``k``
  keeps (its hidden state) and ``max_k A_k`` is the one unit recomputed at a time in the backward pass.
  Temporaries (an op's workspace, the gradient of an activation while it is computed) and the CUDA
  context are not counted: the plan keeps ``HEADROOM`` (10%) of ``plan.gpu_memory_gb`` free for them.

A run fits when the total of the configured mode (with or without checkpointing, as
``trainer.activation_checkpointing`` says) is at most 90% of ``plan.gpu_memory_gb``. One that does
not exits 2 with one line after the table: by how much it does not fit and what to change (FSDP,
more GPUs, checkpointing, a smaller micro-batch via ``trainer.accumulate``).

The architecture: ``model.config`` where the recipe states it (then ``model.pretrained`` is never
opened: no download, no weights), else ``model.pretrained`` as a local folder (built on the meta
device, so its weights are not loaded). The vocabulary comes from the tokenizer where one can be read
locally or from the hub, else from ``model.config``. Nothing here knows a model family: the depth units
(:func:`sortedcli.nest.nesting`) and autograd's saved tensors are all it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from ..errors import UsageError

GiB = 2**30
HEADROOM = 0.10  # of the GPU's memory: CUDA context, allocator fragmentation, temporaries
FP32 = 4


@dataclass
class Activations:
    """Bytes autograd saves for the backward pass, split by where they are saved."""

    units: list[int] = field(default_factory=list)  # A_k: saved inside depth unit k
    inputs: list[int] = field(default_factory=list)  # I_k: unit k's inputs that need a gradient
    rest: int = 0  # saved outside the depth units (embeddings, final norm, head, loss, extra exits)
    readouts: int = 0  # extra exits read out (SoFT): each keeps its hidden state for a chunked readout

    @property
    def total(self) -> int:
        return sum(self.units) + self.rest

    @property
    def checkpointed(self) -> int:
        return sum(self.inputs) + self.rest + (max(self.units) if self.units else 0)


@dataclass
class Plan:
    """Per-rank bytes of a training run (see the module doc for the formulas)."""

    params: int  # P, parameters held (numel)
    largest_unit: int  # parameters of the largest depth unit
    root: int  # parameters outside the depth units (FSDP2's root group)
    ranks: int
    sharded: bool
    optimizer_states: int  # fp32 states per parameter: AdamW 2, SGD with momentum 1
    activations: Activations
    micro_batch: int
    length: int | None
    compute_dtype: torch.dtype
    checkpointing: bool
    gpu_gb: float
    trainable: int | None = None  # parameters that train (model.lora: the adapters only); None: all P
    teacher: int = 0  # parameters of a frozen copy of the starting model (distill.teacher=initial), whole per rank

    @property
    def trained(self) -> int:
        return self.params if self.trainable is None else self.trainable

    @property
    def shards(self) -> int:
        return self.ranks if self.sharded else 1

    @property
    def parameters(self) -> float:
        return FP32 * self.params / self.shards

    @property
    def gradients(self) -> float:
        return FP32 * self.trained / self.shards

    @property
    def optimizer(self) -> float:
        return self.optimizer_states * FP32 * self.trained / self.shards

    @property
    def working(self) -> float:
        c = torch.finfo(self.compute_dtype).bits // 8
        if self.sharded:
            return (2 * self.largest_unit + self.root) * c + self.largest_unit * FP32
        return 2 * self.params if self.compute_dtype == torch.bfloat16 else 0

    @property
    def frozen_teacher(self) -> float:  # kept in the compute dtype, no gradients, no optimizer state
        return torch.finfo(self.compute_dtype).bits // 8 * self.teacher

    @property
    def states(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.working + self.frozen_teacher

    def total(self, checkpointing: bool) -> float:
        return self.states + (self.activations.checkpointed if checkpointing else self.activations.total)

    @property
    def usable(self) -> float:
        return self.gpu_gb * GiB * (1 - HEADROOM)

    def fits(self, checkpointing: bool | None = None) -> bool:
        return self.total(self.checkpointing if checkpointing is None else checkpointing) <= self.usable


# --- saved tensors ------------------------------------------------------------------------------

def _storage(t: torch.Tensor) -> tuple[int, int]:
    from torch.multiprocessing.reductions import StorageWeakRef

    s = t.untyped_storage()
    return StorageWeakRef(s).cdata, s.nbytes()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def saved_activations(model: nn.Module, inputs, readouts: int = 0) -> Activations:
    """The bytes autograd saves in ``model``'s forward pass on ``inputs`` plus a cross-entropy over the
    logits, by depth unit (:class:`Activations`), and the hidden states of ``readouts`` more exits
    (each read out a chunk at a time in training, so no two readouts are alive at once). Runs on any
    device; on ``meta`` nothing is computed or allocated."""
    from ..nest import call, nesting

    nest = nesting(model)
    units = [u.module for u in nest.units]
    skip = {_storage(t)[0] for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    acts = Activations(units=[0] * len(units), inputs=[0] * len(units), readouts=readouts)
    where: list[int] = []
    last: list[torch.Tensor] = []

    held: list[torch.Tensor] = []  # alive until the end: a freed storage's address could be reused

    def pack(t: torch.Tensor):
        held.append(t)
        key, size = _storage(t)
        if key not in skip and key not in seen:
            seen.add(key)
            if where:
                acts.units[where[-1]] += size
            else:
                acts.rest += size
        return t

    def enter(k):
        def hook(module, args, kwargs):
            where.append(k)
            acts.inputs[k] += sum(t.numel() * t.element_size() for t in _tensors((args, kwargs))
                                  if t.is_floating_point() and t.requires_grad)
        return hook

    def leave(module, args, out):
        where.pop()
        last[:] = [next(_tensors(out))]

    hooks = [m.register_forward_pre_hook(enter(k), with_kwargs=True) for k, m in enumerate(units)]
    hooks += [m.register_forward_hook(leave, always_call=True) for m in units]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = call(model, inputs)
            _cross_entropy(logits)
            if readouts and nest.readout is not None and last:
                # training reads each exit out a chunk at a time and back-propagates it at once
                # (engine.exit_losses): what stays alive per extra exit is its hidden state, gathered
                acts.rest += readouts * last[0].numel() * last[0].element_size()
    finally:
        for h in hooks:
            h.remove()
    return acts


def _cross_entropy(logits: torch.Tensor) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    target = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    return nn.functional.cross_entropy(flat.float(), target)


# --- the model and its inputs, without weights ---------------------------------------------------

def _model_options(cfg: DictConfig) -> tuple[dict, str]:
    """The model options to build on the meta device, and where the architecture comes from."""
    from ..build import plain

    options = plain(cfg.model)
    pretrained = options.get("pretrained")
    if options.get("config") and pretrained:
        return {**options, "pretrained": None}, f"model.config (model.pretrained={pretrained} is not read)"
    if pretrained:
        from pathlib import Path

        if not Path(str(pretrained)).expanduser().exists():
            raise UsageError(f"model.pretrained={pretrained} is not a local folder and the recipe states no "
                             "model.config: plan reads no weights and goes online for none; pass the architecture as "
                             "model.config={...} (e.g. hidden_size, num_hidden_layers, ...) or a local folder")
        return options, f"model.pretrained={pretrained} (its config; weights not loaded)"
    return options, "model.config" if options.get("config") else "the model's defaults"


def _model_args(cfg: DictConfig) -> dict:
    """The data's ``model_args`` (classes, a language model's vocabulary from its tokenizer where one can
    be read; else the model config's own)."""
    from .. import models
    from ..build import plain
    from ..data import input_spec

    try:
        tokenizer = models.tokenizer(plain(cfg.model))
    except UsageError:
        if not cfg.model.get("config"):
            raise
        tokenizer = None  # a hub id out of reach: the vocabulary is model.config's
    return input_spec(cfg.data, tokenizer)[0]


def _micro_inputs(cfg: DictConfig, example, batch: int, device) -> tuple[object, int | None]:
    """``example`` (the data's input of one item) grown to ``batch`` items of the run's sequence length
    (``data.max_length``) for token inputs, on ``device``; and that length (None for images)."""
    length = cfg.data.get("max_length")

    def grow(t: torch.Tensor) -> torch.Tensor:
        shape = list(t.shape)
        shape[0] = batch
        if not t.is_floating_point() and t.dim() == 2 and length:
            shape[1] = int(length)
        return torch.zeros(shape, dtype=t.dtype, device=device)

    if isinstance(example, dict):
        # the first input only (a language model's token ids): an all-ones attention mask changes no
        # shape, and reading it (is any position padded?) is what a meta tensor cannot do
        first = next(iter(example))
        grown = {first: grow(example[first])}
        tokens = not example[first].is_floating_point() and example[first].dim() == 2
    else:
        grown, tokens = grow(example), False
    return grown, (int(length) if tokens and length else None)


def _compute_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype training computes in on a GPU: bf16 unless ``trainer.precision=fp32``."""
    return torch.float32 if cfg.trainer.get("precision", "auto") == "fp32" else torch.bfloat16


def _optimizer_states(cfg: DictConfig) -> int:
    name = cfg.optim.get("name")
    if name == "adamw":
        return 2
    if name == "sgd":
        return 1 if cfg.optim.get("momentum", 0.9) else 0
    raise UsageError(f"unknown optimizer {name!r}: choose sgd or adamw")


def estimate(cfg: DictConfig) -> tuple[Plan, str, nn.Module]:
    """The :class:`Plan` of ``cfg`` (a train config), where its architecture came from, and the meta model."""
    from .. import models
    from ..build import build_grid, build_sampler, check_settings
    from ..data import input_spec
    from ..nest import has_exits, nesting, trunk_groups, use

    check_settings(cfg)
    t = cfg.trainer
    ranks, accumulate = int(t.get("devices", 1)), int(t.get("accumulate", 1))
    if t.batch_size % (ranks * accumulate):
        raise UsageError(f"trainer.batch_size={t.batch_size} is the global batch and must be a multiple of "
                         f"trainer.devices={ranks} x trainer.accumulate={accumulate}")
    micro = t.batch_size // (ranks * accumulate)
    sharded = t.get("strategy", "ddp") == "fsdp" and ranks > 1
    options, source = _model_options(cfg)
    model_args = _model_args(cfg)
    name = options.pop("name")
    try:
        with torch.device("meta"):
            model = models.create(name, **model_args, **options)
    except Exception:  # noqa: BLE001 - a loader that refuses the meta device (transformers' from_pretrained)
        if not options.get("pretrained"):
            raise
        model = models.create(name, **model_args, **options).to("meta")  # its error, if it fails, is the user's
        source = (f"model.pretrained={options['pretrained']}, whose loader refuses the meta device: its weights "
                  "were read once (state model.config to plan without them)")
    grid = build_grid(cfg, model)
    compute = _compute_dtype(cfg)
    nn.Module.train(model.to(compute))  # (not a library override: transformers would pick kernels for the device)

    units = nesting(model).units
    in_units = {id(p) for u in units for p in u.module.parameters()}
    _, example, _ = input_spec(cfg.data, None)
    inputs, length = _micro_inputs(cfg, example, micro, "meta")
    # the trunk of the largest sub-model with the exits the sampler reads out of it in one pass (SoFT's
    # sampler=all: every depth level of the grid)
    drawn = build_sampler(cfg, grid).step()
    members = next((m for trunk, m in trunk_groups(model, [grid.largest, *drawn]) if trunk == grid.largest),
                   [grid.largest])
    readouts = len(set(members)) - 1 if has_exits(model) else 0
    with use(model, grid.largest):
        acts = saved_activations(model, inputs, readouts)
    held = sum(p.numel() for p in model.parameters())  # frozen weights (model.lora's base) are held too
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = Plan(params=held,
                largest_unit=max((sum(p.numel() for p in u.module.parameters()) for u in units), default=0),
                root=sum(p.numel() for p in model.parameters() if id(p) not in in_units),
                ranks=ranks, sharded=sharded, optimizer_states=_optimizer_states(cfg), activations=acts,
                micro_batch=micro, length=length, compute_dtype=compute,
                checkpointing=bool(t.get("activation_checkpointing", False)),
                gpu_gb=float(OmegaConf.select(cfg, "plan.gpu_memory_gb", default=80)),
                trainable=None if trainable == held else trainable,
                teacher=held if cfg.get("distill", {}).get("enabled") and cfg.distill.get("teacher") == "initial" else 0)
    return plan, source, model


# --- advice --------------------------------------------------------------------------------------

def advice(plan: Plan) -> str:
    """What to change so that ``plan`` fits, one clause per change that would make it fit."""
    gb = size
    need = plan.total(plan.checkpointing)
    out = [f"does not fit: {gb(need)} per rank against {gb(plan.usable)} usable of plan.gpu_memory_gb="
           f"{plan.gpu_gb:g} ({gb(need - plan.usable)} over)"]
    fixes = []
    if not plan.checkpointing and plan.fits(True):
        fixes.append(f"trainer.activation_checkpointing=true ({gb(plan.total(True))})")
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):  # FSDP over n ranks: the global batch split n ways
        if n < plan.ranks or (n == plan.ranks and plan.sharded):
            continue
        if (plan.ranks * plan.micro_batch) % n:
            break  # the micro-batch would not divide: trainer.accumulate is the lever then
        other = replace(plan, ranks=n, sharded=True, micro_batch=plan.ranks * plan.micro_batch // n)
        scale = other.micro_batch / plan.micro_batch
        acts = (plan.activations.checkpointed if plan.checkpointing else plan.activations.total) * scale
        total = other.states + acts
        if total <= plan.usable:
            fixes.append(f"trainer.strategy=fsdp trainer.devices={n} ({gb(total)})")
            break
    if plan.micro_batch > 1:
        fixes.append(f"a smaller micro-batch (now {plan.micro_batch}: raise trainer.accumulate; activations scale "
                     "with it)")
    return out[0] + (": " + "; or ".join(fixes) if fixes else "")


# --- the command ---------------------------------------------------------------------------------

def size(b: float) -> str:
    """Bytes as GiB (from 1 GiB), MiB or KiB."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20)):
        if b >= scale:
            return f"{b / scale:,.2f} {unit}"
    return f"{b / 2**10:,.1f} KiB"


def table(plan: Plan, title: str) -> Table:
    gb = size
    s = f"/ {plan.ranks}" if plan.sharded else ""
    tab = Table(title=title)
    tab.add_column("per rank")
    tab.add_column("estimate")
    tab.add_column("memory", justify="right")
    k = plan.optimizer_states
    n = "P" if plan.trainable is None else f"{plan.trainable:,} trained"
    rows = [
        ("parameters", f"fp32 master weights, 4 x {plan.params:,} {s}", plan.parameters),
        ("gradients", f"fp32, 4 x {n} {s}", plan.gradients),
        ("optimizer state", f"{k} fp32 state{'s' if k != 1 else ''} per parameter, {4 * k} x {n} {s}", plan.optimizer),
        ("working copies", "gathered layers (2 x the largest unit + the root) and one unit's fp32 gradient"
         if plan.sharded else ("bf16 copies of the weights (autocast)" if plan.working else "none (fp32)"),
         plan.working),
        *([("frozen teacher", f"distill.teacher=initial: the starting model, {plan.frozen_teacher // plan.teacher} x "
            f"{plan.teacher:,}, no gradients", plan.frozen_teacher)] if plan.teacher else []),
        ("activations", f"saved for backward, micro-batch {plan.micro_batch}"
         + (f" x {plan.length} tokens" if plan.length else "")
         + (f", {plan.activations.readouts} more exits' hidden states (at most)"
            if plan.activations.readouts else ""), plan.activations.total),
        ("activations, checkpointed", "each layer's input + the rest + one layer recomputed",
         plan.activations.checkpointed),
    ]
    for name, how, value in rows:
        tab.add_row(name, how, gb(value))
    for ckpt in (False, True):
        mark = " (configured)" if ckpt == plan.checkpointing else ""
        verdict = "[green]fits[/]" if plan.fits(ckpt) else "[red]does not fit[/]"
        tab.add_row(f"[bold]total{', checkpointed' if ckpt else ''}{mark}[/]",
                    f"{verdict} in {plan.usable / GiB:.1f} of {plan.gpu_gb:g} GiB (10% kept free)",
                    f"[bold]{gb(plan.total(ckpt))}[/]")
    return tab


def run(cfg: DictConfig, console: Console | None = None) -> Plan:
    """Print the memory plan of ``cfg`` (a train config) per rank; raise :class:`UsageError` (one line,
    exit 2) after the table when the configured run does not fit."""
    console = console or Console()
    plan, source, _ = estimate(cfg)
    where = (f"{plan.ranks} ranks, FSDP2" if plan.sharded else
             f"{plan.ranks} ranks, DDP (replicas)" if plan.ranks > 1 else "1 GPU")
    title = f"sortednet plan: {cfg.model.name}, {plan.params / 1e9:.2f}B parameters, {where}"
    console.print(table(plan, title))
    console.print(f"architecture from {source}; {str(plan.compute_dtype).removeprefix('torch.')} compute; "
                  f"optim={cfg.optim.name}", soft_wrap=True)
    if not plan.fits():
        raise UsageError(advice(plan))
    console.print(f"fits: {size(plan.total(plan.checkpointing))} per rank of {size(plan.usable)} usable")
    return plan
