"""Which sub-models one optimizer step trains.

Every schedule returns, per step, a list of sub-models; the engine runs forward/backward on each
with its loss divided by the list's length, accumulating gradients into the shared weights, then
takes one optimizer step. A schedule owns its own seeded ``torch.Generator`` (never the global
RNG), so the same seed draws the same sub-models on every rank and after a resume.

- ``sortednet`` (the paper): ``g`` sub-models drawn uniformly from the grid (with replacement); with
  ``all_exits``, each drawn sub-model brings every depth of itself along (for stacks with exits they
  share one trunk pass: g widths x every exit for the cost of g forwards).
- ``sandwich`` (US-Nets): the largest, the smallest and ``n`` drawn at random.
- ``all`` (SoFT): every sub-model of the grid, every step.
- ``full``: the largest sub-model only: plain training, the baseline.
- ``weighted``: ``g`` drawn from a fixed, non-uniform distribution over the grid, ``p ~ size^power``
  where ``size`` is the product of each level over its dimension's largest level (a cost proxy that
  orders sub-models as their FLOPs do); ``power < 0`` favours the small sub-models.
- ``lossaware``: ``g`` drawn with ``p ~ ema_loss^sharpness`` (mixed with a uniform ``floor``): the
  sub-models whose training loss lags are drawn more often. The engine reports each trained
  sub-model's loss through :meth:`Sampler.observe`.
- ``progressive`` (Once-for-All's progressive shrinking): the grid ordered largest first; during the
  first ``warmup`` of the schedule only the largest trains, then the drawn range grows toward the
  small end until the whole grid is open at ``ramp``.

``sortednet``, ``weighted``, ``lossaware`` and ``progressive`` take ``largest: true`` to train the largest sub-model
every step besides the ``g`` drawn ones (the sandwich rule's upper slice; in-place distillation,
``distill.enabled=true``, then has its teacher for free). Every schedule keeps its position (steps
taken, told the schedule length by :meth:`Sampler.start`) and any statistics in its ``state_dict``,
so a resumed run draws exactly what it would have drawn.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod

import torch

from .nest import Grid, SubModel


class Sampler(ABC):
    """A schedule: ``step()`` names the sub-models of the next optimizer step (subclasses write
    ``draw``). The engine calls ``start(total_steps)`` once before training and ``observe(subs,
    losses)`` after every step; both are no-ops unless a schedule needs them."""

    #: whether the schedule trains the full model alone (the baseline): no smaller sub-model is trained
    only_largest = False

    name = "base"

    def __init__(self, grid: Grid, seed: int = 0):
        self.grid = grid
        self.members = grid.submodels()
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0  # optimizer steps drawn so far (saved, so a resume continues the schedule)
        self.total: int | None = None  # the schedule length, told by start()
        self.notes: list[str] = []  # what the schedule changed of its settings, for the user (train prints them)

    def start(self, total_steps: int) -> None:
        self.total = max(1, int(total_steps))

    @property
    def progress(self) -> float:
        """Fraction of the schedule done, in [0, 1] (0 until :meth:`start` is called)."""
        return min(1.0, self.steps / self.total) if self.total else 0.0

    def step(self) -> list[SubModel]:
        subs = self.draw()
        self.steps += 1
        return subs

    @abstractmethod
    def draw(self) -> list[SubModel]:
        """This step's sub-models (``step`` counts the step)."""

    def observe(self, subs: list[SubModel], losses: list[float]) -> None:
        """Each trained sub-model's (label) loss of the last step, in the order of ``subs``."""

    def _fit_g(self, g) -> int:
        """``g`` checked, and at most the grid's size: more draws per step than there are sub-models
        cost a forward each for duplicates (``g=1000`` on 40 sub-models made steps 10x slower)."""
        g, n = _check_g(g), len(self.members)
        if g > n:
            self.notes.append(f"sampler.g={g} is more than the {n} sub-models of the grid: {n} are drawn per step "
                              "(sampler=all trains every one of them each step)")
            return n
        return g

    def _random(self, n: int) -> list[SubModel]:
        idx = torch.randint(len(self.members), (n,), generator=self.generator).tolist()
        return [self.members[i] for i in idx]

    def _weighted(self, weights: torch.Tensor, n: int, among: list[SubModel] | None = None) -> list[SubModel]:
        among = self.members if among is None else among
        idx = torch.multinomial(weights.double(), n, replacement=True, generator=self.generator).tolist()
        return [among[i] for i in idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps = state.get("steps", 0)  # checkpoints from before schedules kept a position


def size(sub: SubModel, grid: Grid) -> float:
    """Product over dimensions of the level over the dimension's largest level, in (0, 1]: ranks
    sub-models as their cost does (FLOPs grow with every dimension), without measuring a model."""
    out = 1.0
    for d in grid.dims:
        out *= float(sub[d.name]) / float(d.largest)
    return out


def _with_largest(grid: Grid, largest: bool, drawn: list[SubModel]) -> list[SubModel]:
    return [grid.largest, *drawn] if largest else drawn


def _check_g(g) -> int:
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise ValueError(f"sampler.g must be an integer >= 1, got {g!r}")
    return g


class SortedNetSampler(Sampler):
    name = "sortednet"

    def __init__(self, grid, seed=0, g: int = 1, all_exits: bool = False, largest: bool = False):
        super().__init__(grid, seed)
        self.g, self.all_exits, self.largest = self._fit_g(g), bool(all_exits), bool(largest)

    def draw(self) -> list[SubModel]:
        drawn = self._random(self.g)
        if self.all_exits:
            drawn = [deeper for sub in drawn for deeper in self.grid.along_counts(sub)]
        return _with_largest(self.grid, self.largest, drawn)


class SandwichSampler(Sampler):
    name = "sandwich"

    def __init__(self, grid, seed=0, n: int = 2):
        super().__init__(grid, seed)
        if n < 0:
            raise ValueError(f"sampler.n must be >= 0, got {n}")
        self.n = n

    def draw(self) -> list[SubModel]:
        return [self.grid.largest, self.grid.smallest, *self._random(self.n)]


class AllSampler(Sampler):
    name = "all"

    def draw(self) -> list[SubModel]:
        return list(self.members)


class FullSampler(Sampler):
    name = "full"
    only_largest = True

    def draw(self) -> list[SubModel]:
        return [self.grid.largest]


class WeightedSampler(Sampler):
    """``g`` sub-models drawn with ``p ~ size^power`` (fixed for the whole run)."""

    name = "weighted"

    def __init__(self, grid, seed=0, g: int = 1, power: float = -1.0, largest: bool = False):
        super().__init__(grid, seed)
        self.g, self.power, self.largest = self._fit_g(g), float(power), bool(largest)
        sizes = torch.tensor([size(s, grid) for s in self.members], dtype=torch.float64)
        self.probs = sizes.pow(self.power) / sizes.pow(self.power).sum()

    def draw(self) -> list[SubModel]:
        return _with_largest(self.grid, self.largest, self._weighted(self.probs, self.g))


class LossAwareSampler(Sampler):
    """``g`` sub-models drawn with ``p = (1 - floor) * ema^sharpness / sum + floor / N``, ``ema`` the
    exponential moving average (``momentum``) of each sub-model's training loss as observed; a
    sub-model not yet observed counts as the worst one seen (uniform before any observation)."""

    name = "lossaware"

    def __init__(self, grid, seed=0, g: int = 1, sharpness: float = 2.0, momentum: float = 0.9,
                 floor: float = 0.2, largest: bool = False):
        super().__init__(grid, seed)
        if not 0 <= floor <= 1:
            raise ValueError(f"sampler.floor must lie in [0, 1], got {floor}")
        if not 0 <= momentum < 1:
            raise ValueError(f"sampler.momentum must lie in [0, 1), got {momentum}")
        if sharpness < 0:
            raise ValueError(f"sampler.sharpness must be >= 0, got {sharpness}")
        self.g, self.largest = self._fit_g(g), bool(largest)
        self.sharpness, self.momentum, self.floor = float(sharpness), float(momentum), float(floor)
        self.index = {s: i for i, s in enumerate(self.members)}
        self.ema = torch.full((len(self.members),), float("nan"), dtype=torch.float64)

    def probabilities(self) -> torch.Tensor:
        n = len(self.members)
        seen = ~torch.isnan(self.ema)
        if not seen.any():
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        ema = torch.where(seen, self.ema, self.ema[seen].max()).clamp_min(1e-8)
        w = ema.pow(self.sharpness)
        return (1 - self.floor) * w / w.sum() + self.floor / n

    def draw(self) -> list[SubModel]:
        return _with_largest(self.grid, self.largest, self._weighted(self.probabilities(), self.g))

    def observe(self, subs, losses) -> None:
        for sub, loss in zip(subs, losses):
            i = self.index.get(sub)
            if i is None or loss != loss:  # not a grid member, or a NaN loss
                continue
            old = self.ema[i].item()
            self.ema[i] = loss if old != old else self.momentum * old + (1 - self.momentum) * loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ema": self.ema.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ema = state["ema"].clone().to(torch.float64)


class ProgressiveSampler(Sampler):
    """Once-for-All's progressive shrinking over the grid ordered by :func:`size`, largest first: the
    largest alone until ``warmup`` of the schedule, then ``g`` drawn uniformly from the largest
    ``open`` members, ``open`` growing linearly to the whole grid at ``ramp``."""

    name = "progressive"

    def __init__(self, grid, seed=0, g: int = 1, warmup: float = 0.1, ramp: float = 0.5, largest: bool = False):
        super().__init__(grid, seed)
        if not 0 <= warmup <= ramp <= 1:
            raise ValueError(f"sampler.warmup and sampler.ramp must satisfy 0 <= warmup <= ramp <= 1, "
                             f"got {warmup} and {ramp}")
        self.g, self.warmup, self.ramp, self.largest = self._fit_g(g), float(warmup), float(ramp), bool(largest)
        # largest first; ties (same size) in grid order
        self.order = sorted(self.members, key=lambda s: -size(s, grid))

    def open(self) -> int:
        """How many members (largest first) may be drawn at the current position: 1 during the
        warmup, then from 2 up to all of them."""
        p, n = self.progress, len(self.order)
        if p < self.warmup:
            return 1
        if self.ramp <= self.warmup or p >= self.ramp:
            return n
        return max(min(2, n), math.ceil(n * (p - self.warmup) / (self.ramp - self.warmup)))

    def draw(self) -> list[SubModel]:
        k = self.open()
        if k == 1:
            return [self.grid.largest]
        among = self.order[:k]
        return _with_largest(self.grid, self.largest, self._weighted(torch.ones(k), self.g, among))


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (SortedNetSampler, SandwichSampler, AllSampler, FullSampler, WeightedSampler,
                              LossAwareSampler, ProgressiveSampler)
}


# --- the options of a schedule: its constructor's signature is the schema (names, types, defaults)

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: annotation -> (what a value must be, check). ``bool(largest)`` made ``largest=flase`` true and
#: ``float(power)`` said "could not convert string to float": a value is checked against its type first.
TYPES = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("an integer", _is_int),
    "float": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
}


def options_of(name: str) -> dict[str, tuple[str, object]]:
    """``{option: (annotation, default)}`` that sampler ``name`` takes: its constructor's keyword
    parameters after ``grid`` and ``seed``."""
    params = list(inspect.signature(SAMPLERS[name].__init__).parameters.values())[3:]  # self, grid, seed
    return {p.name: (p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", ""),
                     p.default) for p in params}


def check_options(name: str, options: dict) -> None:
    """Raise ``ValueError`` with one sentence for an option sampler ``name`` does not take (and how to
    drop it) or a value not of the option's type (the key, the value, what it must be)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    known = options_of(name)
    for key, value in options.items():
        if key not in known:
            takes = f"it takes {', '.join(known)}" if known else "it takes none"
            raise ValueError(f"takes no setting {key} ({takes}; the config or recipe gave sampler.{key}): drop it "
                             f"with '~sampler.{key}'")
        annotation = known[key][0]
        if annotation in TYPES:
            want, ok = TYPES[annotation]
            if not ok(value):
                raise ValueError(f"sampler.{key} must be {want}, got {value!r}")


def create_sampler(name: str, grid: Grid, seed: int = 0, **options) -> Sampler:
    check_options(name, options)
    return SAMPLERS[name](grid, seed, **options)
