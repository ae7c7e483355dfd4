"""Data parallelism across processes: ``torch.distributed`` is the engine, torchrun the launcher.

``torchrun --nproc-per-node N -m sortedcli train ...`` starts one process per device; ``trainer.devices=N``
makes ``sortednet`` start them itself through torch's elastic launch API (what torchrun uses). Each
process calls :func:`setup`, which joins the process group (gloo on the CPU, NCCL on GPUs) and
returns a :class:`Dist`: the rank, the world size and the few collectives the engine needs. A
single process gets ``Dist()``, whose collectives do nothing, so the engine has one code path.

Why not ``DistributedDataParallel``: its reducer assumes one graph per iteration, but a SortedNet
step runs g different sub-models (some skip blocks; sliced weights), accumulating gradients
locally. Every rank runs *the same* sub-models (the sampler's generator is seeded identically and
sees the same all-reduced losses), so after the local backward passes the ranks agree on which
parameters have a gradient, and one bucketed all-reduce per optimizer step averages exactly those:
no per-micro-step communication (DDP's ``no_sync``), no ``find_unused_parameters`` graph walk for
the blocks a shallow sub-model skipped, no hang.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 32 * 2**20  # gradients are all-reduced in flat buckets of about this size


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world`` data-parallel processes (``Dist()``: the only one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: the model is sharded with FSDP2 (``fully_shard``), which reduce-scatters gradients itself
    sharded: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over the ranks (a new tensor; ``tensor`` itself when alone)."""
        if not self.enabled:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / self.world if self.enabled else tensor

    def gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (any picklable object)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_module(self, model: nn.Module) -> None:
        """Make every rank's parameters and buffers rank 0's (they start equal; this makes sure)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)

    def average_gradients(self, model: nn.Module) -> None:
        """Average the accumulated ``.grad`` of ``model``'s parameters over the ranks, in flat buckets.

        Parameters without a gradient (a block no sampled sub-model ran) are skipped; every rank ran the
        same sub-models, so every rank skips the same ones and the buckets line up."""
        if not self.enabled or self.sharded:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel() * g.element_size()
            last = i == len(grads) - 1
            if size >= BUCKET_BYTES or last or grads[i + 1].dtype != g.dtype or grads[i + 1].device != g.device:
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat)
                flat /= self.world
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
                bucket, size = [], 0


# --- joining and launching -----------------------------------------------------------------------

def env_world() -> int:
    """The world size torchrun (or ``trainer.devices``) gave this process; 1 when not launched so."""
    return int(os.environ.get("WORLD_SIZE", "1"))


LAUNCHER_PID = "SORTEDNET_LAUNCHER_PID"  # set by launch(): the process whose death ends every rank
ERRORS = "SORTEDNET_ERRORS"  # set by launch(): a folder where a rank leaves its one-line error for the launcher


def die_with_launcher() -> None:
    """A rank that ``trainer.devices=N`` started dies with the ``sortednet`` process that started it.
    torch's elastic agent puts each rank in a session of its own, so a ``kill -9`` of the launcher (or
    of its process group) would leave the ranks training on and writing checkpoints into the run
    that a ``--resume`` is continuing. Linux: ``PR_SET_PDEATHSIG``; elsewhere a no-op."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before the line above took effect
        os._exit(1)


def setup(device: torch.device) -> Dist:
    """Join the process group when launched as one of several processes (gloo for the CPU, NCCL for
    CUDA); the GPU is the local rank's. Idempotent; ``Dist()`` for a single process."""
    world = env_world()
    if world <= 1:
        return Dist()
    die_with_launcher()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(rank=rank, world=world, local_rank=local_rank)


def local_device(device: torch.device, d: Dist) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA run of several processes; ``device`` otherwise."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.enabled else device


def shutdown(clean: bool = True) -> None:
    """Leave the process group. After a clean finish every rank first waits for the others: a rank that
    tears its gloo connections down while a peer is still reading from them can abort that peer
    ("terminate called without an active exception", seen once in CI). After an error there is no
    waiting (the peers may be stuck or gone)."""
    if dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError:  # a peer already failed and left: its error is the one to report
                pass
        dist.destroy_process_group()


def agree_on_run_dir(run_dir, d: Dist):
    """Rank 0's run folder, on every rank. Under plain torchrun each rank's Hydra names its own folder
    (``${now:}`` may differ by a second): the others are dropped when empty."""
    from pathlib import Path

    chosen = Path(d.broadcast(str(run_dir)))
    mine = Path(run_dir)
    if mine.resolve() != chosen.resolve() and mine.is_dir() and not any(mine.iterdir()):
        shutil.rmtree(mine, ignore_errors=True)
    return chosen


def launch(nprocs: int, argv: list[str], cuda: bool) -> int:
    """Run ``python -m sortedcli ARGV`` as ``nprocs`` processes of one job on this machine, through
    torch's elastic launch API (torchrun's ``--standalone``: a local rendezvous on a free port, no
    restarts). Returns the exit status: 0, 2 after a mistake (said here, once), or the first failed
    rank's."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    import logging

    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nprocs))
    os.environ[LAUNCHER_PID] = str(os.getpid())
    errors = tempfile.mkdtemp(prefix="sortednet-errors-")
    os.environ[ERRORS] = errors
    # a rank's mistake is left in `errors` and said here once (leave_error), a bug's traceback is printed
    # by its process; the agent's log lines about stopping the other ranks would only repeat them
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "sortedcli", *argv)
    except ChildFailedError as e:
        said = relay_errors(errors)
        codes = [f.exitcode for _, f in sorted(e.failures.items())]
        return 2 if said else next((c for c in codes if c and c > 0), 1)
    finally:
        del os.environ[ERRORS]
        shutil.rmtree(errors, ignore_errors=True)
    return 0


def leave_error(message: str) -> bool:
    """A launched rank's one-line error, left for :func:`launch` to say (True), instead of printed: the
    agent stops every rank once one has failed, so a rank that prints may be stopped before it does.
    False where this process was not started by :func:`launch` (plain torchrun, one process)."""
    folder = os.environ.get(ERRORS)
    if not folder or not os.path.isdir(folder):
        return False
    rank = os.environ.get("RANK", "0")
    tmp = os.path.join(folder, f".rank{rank}.tmp")
    with open(tmp, "w") as f:
        f.write(message)
    os.replace(tmp, os.path.join(folder, f"rank{rank}"))
    return True


def relay_errors(folder: str) -> bool:
    """Print the errors the ranks left (each different message once, in rank order); True if any."""
    names = sorted((n for n in os.listdir(folder) if n.startswith("rank")), key=lambda n: int(n[4:]))
    messages = list(dict.fromkeys(open(os.path.join(folder, n)).read() for n in names))
    for message in messages:
        print(f"sortednet: error: {message}", file=sys.stderr, flush=True)
    return bool(messages)


# --- FSDP2: sharded parameters, gradients and optimizer state --------------------------------------

def shard(model: nn.Module, param_dtype: torch.dtype | None = None) -> int:
    """Shard ``model`` with FSDP2 (``fully_shard``): each depth unit (a transformer layer) is its own
    group, gathered just before it runs; the embeddings, final norm and head belong to the root.
    Slicing (heads, ffn) and exits work unchanged: a unit's parameters are whole tensors while it runs.
    ``param_dtype`` (the run's autocast dtype: bf16 on a GPU that has it): FSDP2's mixed precision,
    the gathered parameters in that dtype (half the all-gather traffic and memory), the gradients
    reduced in fp32 and the sharded master weights and optimizer state kept in fp32. Returns the
    number of groups.

    The exits' own readouts (``model.exits``) are groups of their own too. They run after the root's
    forward (an exit is read from a hidden state caught on the way), and FSDP2 reduces a group's
    gradients from a callback queued when the backward first reaches an output of a sharded module.
    With a frozen trunk (``model.exits.trunk=frozen``) no output of the root or of a layer needs a
    gradient, so with the readouts in the root group that callback never ran and each rank stepped on
    its own batch's gradients (the readouts drifted 0.003 from the one-process run in one step); as
    groups, their own outputs carry the hook."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .nest import nesting

    policy = MixedPrecisionPolicy() if param_dtype is None else \
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    nest = nesting(model)
    readouts = [] if nest.exits is None else list(nest.exits.values())
    for module in [unit.module for unit in nest.units] + readouts:
        fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return len(nest.units) + len(readouts) + 1


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> tuple[dict, dict]:
    """``(weights, optimizer state)`` as whole tensors on the CPU, in the format a single process
    loads. Sharded: a collective that every rank calls; rank 0 receives them (the others get {})."""
    if not d.sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, d: Dist) -> None:
    """Load an optimizer state saved by :func:`full_state` with any number of processes, sharded or
    not: ``optimizer.state_dict()``'s format (parameters by index) or FSDP's (by name)."""
    by_name = any(isinstance(p, str) for group in state["param_groups"] for p in group["params"])
    if not by_name and not d.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:  # indices count the parameters group by group, as the optimizer holds them
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        state = {"state": {order[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# --- sharded checkpoints: torch.distributed.checkpoint (DCP) ---------------------------------------

def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(weights, optimizer state)`` as this rank's shards (DTensors, no gather), keyed by parameter name:
    what :func:`save_sharded` writes. Plain tensors for a model that is not sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)


def local_values(state: dict) -> list[torch.Tensor]:
    """The tensors of ``state`` this rank holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    return [v.to_local() if isinstance(v, DTensor) else v for v in state.values() if isinstance(v, torch.Tensor)]


def save_sharded(weights: dict, optimizer_state: dict, folder) -> None:
    """Write ``weights`` and ``optimizer_state`` (:func:`sharded_state`) into ``folder/model`` and
    ``folder/optim`` with torch.distributed.checkpoint: a collective of every rank, each writing its own
    shards (``__RANK_0.distcp``), rank 0 the metadata last."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp

    from .runs import DCP_MODEL, DCP_OPTIM

    dcp.save(weights, checkpoint_id=str(Path(folder) / DCP_MODEL))
    dcp.save({"optim": optimizer_state}, checkpoint_id=str(Path(folder) / DCP_OPTIM))


def _tensors(folder) -> dict:
    """``{key: TensorStorageMetadata}`` of a DCP folder (global shapes and dtypes), or one line."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .errors import UsageError

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # missing, truncated or foreign
        raise UsageError(f"sharded checkpoint {folder} is corrupt or unreadable ({type(e).__name__}): use an "
                         "earlier checkpoint or retrain") from None
    return {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


@contextlib.contextmanager
def _one_process():
    """Silence DCP's warning that it loads in a single process: that is what is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def dcp_shapes(folder) -> dict[str, tuple[int, ...]]:
    """``{key: global shape}`` of a DCP folder's tensors, from its ``.metadata`` alone."""
    return {k: tuple(m.size) for k, m in _tensors(folder).items()}


def load_in_place(folder, state: dict[str, torch.Tensor]) -> None:
    """Read DCP folder ``folder`` into ``state``'s own tensors (a model's state_dict: its parameters'
    storage), in this one process whatever the number that wrote it, a shard at a time: no second copy."""
    import torch.distributed.checkpoint as dcp

    from .errors import UsageError

    try:
        with _one_process():
            dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    except Exception as e:  # a shard file missing or truncated
        raise UsageError(f"sharded checkpoint {folder} is corrupt or unreadable ({type(e).__name__}): use an "
                         "earlier checkpoint or retrain") from None


def consolidated(folder) -> dict[str, torch.Tensor]:
    """The whole tensors of DCP folder ``folder`` (a sharded checkpoint's ``model/``), read in this one
    process whatever the number that wrote it (eval, export and generate read a checkpoint into the
    model itself: :func:`load_in_place`)."""
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in _tensors(folder).items()}
    load_in_place(folder, state)
    return state


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt) -> None:
    """Load a sharded checkpoint's weights and optimizer state into ``model`` (sharded or not) and
    ``optimizer``, resharded for this run's processes (a collective where several run). A checkpoint of
    another model (other names or shapes) is refused in one line before anything is read."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from .errors import UsageError
    from .runs import DCP_MODEL, DCP_OPTIM

    folder = Path(ckpt)
    weights, optimizer_state = sharded_state(model, optimizer)  # (initializes the optimizer's state)
    saved = _tensors(folder / DCP_MODEL)
    ours = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    theirs = {k: tuple(m.size) for k, m in saved.items()}
    if ours != theirs:
        differ = sorted(set(ours) ^ set(theirs)) or sorted(k for k in ours if ours[k] != theirs[k])
        key = differ[0]
        said = (f"{key}: {theirs[key]} in the checkpoint, {ours[key]} in this model" if key in ours and key in theirs
                else f"{key} only in {'this model' if key in ours else 'the checkpoint'}")
        raise UsageError(f"sharded checkpoint {folder} holds another model than this run's ({len(differ)} "
                         f"tensor(s) differ, e.g. {said}): resume it with the run (config) that wrote it, or start "
                         "a new run")
    with _one_process():  # (a single process reads every shard itself)
        dcp.load(weights, checkpoint_id=str(folder / DCP_MODEL))
        set_model_state_dict(model, weights)
        # the optimizer's state as saved: parameters that had none (never stepped) get none again
        stored = set(_tensors(folder / DCP_OPTIM))
        box = {"optim": optimizer_state}
        dcp.load(box, checkpoint_id=str(folder / DCP_OPTIM), planner=DefaultLoadPlanner(allow_partial_load=True))
    state = box["optim"]
    state["state"] = {name: values for name, values in state["state"].items()
                      if any(f"optim.state.{name}." in key for key in stored)}
    set_optimizer_state_dict(model, optimizer, state)


# --- construction without copies: the meta device, then each rank's shards only --------------------
#
# Under trainer.strategy=fsdp a model whose family can build it on the meta device (Adapter.build_empty)
# is sharded before any weight exists: fully_shard per depth unit then the root, on meta tensors; each
# rank then allocates its own shards only (to_empty), recomputes the buffers no checkpoint holds
# (Adapter.init_buffers: rotary frequencies), and the pretrained weights arrive from rank 0, which reads
# the safetensors files one at a time and broadcasts each (set_model_state_dict with
# broadcast_from_rank0): every rank keeps the slices of its shards. Why rank 0 reads and the others
# receive, rather than each rank reading its own slices: a machine that is not rank 0's may not have the
# files (another node without the shared disk), and one reader means one pass over the files; the cost,
# a broadcast of each tensor, is what the old path paid for the whole model. Host memory per rank: its
# shards plus, on rank 0, one file, on the others one tensor at a time.

def tied(model: nn.Module) -> list[tuple[str, ...]]:
    """The names that share one parameter (tied input and output embeddings), a tuple per shared one."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [tuple(group) for group in names.values() if len(group) > 1]


def uncovered(model: nn.Module, files) -> list[str]:
    """The state-dict keys of ``model`` that ``files`` (safetensors; their headers only are read) hold
    under no name tied to them or with another shape: what a streamed load could not fill."""
    from safetensors import safe_open

    held: dict[str, tuple[int, ...]] = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as reader:
                held.update({k: tuple(reader.get_slice(k).get_shape()) for k in reader.keys()})
    except Exception:  # noqa: BLE001 - unreadable: the eager load says why, in its own words
        return list(model.state_dict())
    alias = {n: group for group in tied(model) for n in group}
    return [k for k, v in model.state_dict().items()
            if not any(held.get(n) == tuple(v.shape) for n in alias.get(k, (k,)))]


def host_memory(peak: bool = True) -> int | None:
    """This process's peak (``VmHWM``) or present (``VmRSS``) resident memory in bytes; None without /proc."""
    field = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> bool:
    """Start ``VmHWM`` again from the present resident memory (Linux's ``clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def materialize(model: nn.Module, device: torch.device, init_buffers, ties: list[tuple[str, ...]]) -> None:
    """Give a model built on the meta device (and sharded) storage on ``device``: each rank its own shards,
    uninitialized (the weights are loaded next), the buffers no checkpoint holds recomputed by
    ``init_buffers`` (the family's). ``ties`` (:func:`tied`, taken before sharding) must still be tied."""
    model.to_empty(device=device)
    init_buffers(model)
    check_tied(model, ties)


def check_tied(model: nn.Module, ties: list[tuple[str, ...]]) -> None:
    for group in ties:
        first = model.get_parameter(group[0])
        if any(model.get_parameter(n) is not first for n in group[1:]):
            raise RuntimeError(f"{', '.join(group)} were one parameter and are no longer: the sharded model "
                               "would train two copies of it")


def weight_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s parameters and buffers, whole (a DTensor counts its global shape), once each."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_pretrained` did: the files rank 0 read, the largest of them (bytes), and how much
    each rank's resident memory grew by at its peak, from before its shards were allocated to the end of
    the load (None: not measured, e.g. without Linux's /proc)."""

    files: int
    largest: int
    growths: tuple[int | None, ...]

    @property
    def growth(self) -> int | None:
        """The most any rank grew by."""
        return None if None in self.growths else max(self.growths)


def load_pretrained(model: nn.Module, files, device: torch.device, init_buffers, ties: list[tuple[str, ...]],
                    d: Dist) -> Loaded:
    """Materialize the sharded meta ``model`` (:func:`materialize`) and load the pretrained weights of the
    safetensors ``files``: rank 0 reads one file at a time and broadcasts it (``set_model_state_dict``,
    full state dict, ``broadcast_from_rank0``); each rank keeps its slices. A collective of every rank;
    only rank 0's ``files`` are read (the others may not have them)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    files = [str(f) for f in files]
    before = host_memory(peak=False)
    measured = reset_peak_memory() and before is not None
    materialize(model, device, init_buffers, ties)
    count = d.broadcast(len(files) if d.main else None)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for i in range(count):
        state = load_file(files[i]) if d.main else {}
        set_model_state_dict(model, state, options=options)
        del state
    check_tied(model, ties)
    grown = host_memory() - before if measured else None
    growths = d.gather(grown)
    largest = max((os.path.getsize(f) for f in files), default=0) if d.main else 0
    return Loaded(count, d.broadcast(largest), tuple(growths))


def load_whole(model: nn.Module, weights: dict) -> None:
    """Whole ``weights`` that every rank holds (a one-file checkpoint) into the sharded ``model``: each rank
    keeps its shards' slices."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
