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
"""

from __future__ import annotations

import torch

from .nest import Grid, SubModel


class Sampler:
    name = "base"

    def __init__(self, grid: Grid, seed: int = 0):
        self.grid = grid
        self.members = grid.submodels()
        self.generator = torch.Generator().manual_seed(seed)

    def _random(self, n: int) -> list[SubModel]:
        idx = torch.randint(len(self.members), (n,), generator=self.generator).tolist()
        return [self.members[i] for i in idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class SortedNetSampler(Sampler):
    name = "sortednet"

    def __init__(self, grid, seed=0, g: int = 1, all_exits: bool = False):
        super().__init__(grid, seed)
        if g < 1:
            raise ValueError(f"sampler.g must be >= 1, got {g}")
        self.g, self.all_exits = g, bool(all_exits)

    def step(self) -> list[SubModel]:
        drawn = self._random(self.g)
        if not self.all_exits:
            return drawn
        return [deeper for sub in drawn for deeper in self.grid.along_counts(sub)]


class SandwichSampler(Sampler):
    name = "sandwich"

    def __init__(self, grid, seed=0, n: int = 2):
        super().__init__(grid, seed)
        if n < 0:
            raise ValueError(f"sampler.n must be >= 0, got {n}")
        self.n = n

    def step(self) -> list[SubModel]:
        return [self.grid.largest, self.grid.smallest, *self._random(self.n)]


class AllSampler(Sampler):
    name = "all"

    def step(self) -> list[SubModel]:
        return list(self.members)


class FullSampler(Sampler):
    name = "full"

    def step(self) -> list[SubModel]:
        return [self.grid.largest]


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (SortedNetSampler, SandwichSampler, AllSampler, FullSampler)
}


def create_sampler(name: str, grid: Grid, seed: int = 0, **options) -> Sampler:
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}") from None
    return cls(grid, seed, **options)
