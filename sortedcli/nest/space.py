"""Sub-models as values, and the grid of them.

A *dimension* is one axis along which the network is sorted: ``width`` (a fraction of every hidden
channel count), ``depth`` (how many depth units are kept, in the model's sorted order), and later
``heads`` or ``ffn`` for transformers. Each dimension has a tuple of levels, smallest first.

A :class:`SubModel` picks one level per dimension. It is frozen and hashable, has a stable name
(``width0.5-depth12``) and orders by its levels, so that ``a <= b`` along every dimension means ``a``
is nested inside ``b``. The :class:`Grid` is the cartesian product of the dimensions' levels, less
the *duplicates*: two combinations of levels that resolve to the same physical slices of the model
(with 3 key/value heads, heads 0.75 and 1 both keep all 3) are one sub-model; :meth:`Grid.distinct`
keeps the largest combination of each such group (so the full model stays a member) and remembers
which ones it dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Mapping

FRACTION = "fraction"  # a level is a fraction in (0, 1] of the full size (width, heads, ffn)
COUNT = "count"  # a level is a number of units kept, 1..N (depth)


@dataclass(frozen=True)
class Dim:
    """One sorted dimension and its levels (ascending, unique)."""

    name: str
    kind: str
    levels: tuple

    def __post_init__(self):
        if self.kind not in (FRACTION, COUNT):
            raise ValueError(f"dim {self.name!r}: kind must be {FRACTION!r} or {COUNT!r}, got {self.kind!r}")
        if not self.levels:
            raise ValueError(f"dim {self.name!r} has no levels")
        if list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"dim {self.name!r}: levels must be ascending and unique, got {list(self.levels)}")
        if self.kind == FRACTION and not all(0 < v <= 1 for v in self.levels):
            raise ValueError(f"dim {self.name!r}: fractions must lie in (0, 1], got {list(self.levels)}")
        if self.kind == COUNT and not all(isinstance(v, int) and v >= 1 for v in self.levels):
            raise ValueError(f"dim {self.name!r}: counts must be integers >= 1, got {list(self.levels)}")

    @property
    def largest(self):
        return self.levels[-1]


def _fmt(level) -> str:
    return f"{level:g}" if isinstance(level, float) else str(level)


@dataclass(frozen=True, order=True)
class SubModel:
    """One level per dimension, e.g. ``SubModel((("width", 0.5), ("depth", 12)))``.

    Dimensions a sub-model does not name are at their full size.
    """

    levels: tuple[tuple[str, float | int], ...]

    @classmethod
    def of(cls, **levels) -> "SubModel":
        return cls(tuple(levels.items()))

    def __getitem__(self, dim: str):
        return dict(self.levels)[dim]

    def get(self, dim: str, default=None):
        return dict(self.levels).get(dim, default)

    def as_dict(self) -> dict:
        return dict(self.levels)

    @property
    def name(self) -> str:
        return "-".join(f"{d}{_fmt(v)}" for d, v in self.levels) or "full"

    def __str__(self) -> str:
        return self.name

    def within(self, other: "SubModel") -> bool:
        """True when this sub-model is nested inside ``other`` (<= along every dimension)."""
        mine, theirs = self.as_dict(), other.as_dict()
        return all(v <= theirs.get(d, v) for d, v in mine.items())


@dataclass(frozen=True)
class Grid:
    """The cartesian product of the dimensions' levels, in a fixed order (first dim slowest), without
    the combinations in ``duplicates`` (dropped combination -> the member that computes the same)."""

    dims: tuple[Dim, ...]
    duplicates: Mapping[SubModel, SubModel] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        names = [d.name for d in self.dims]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate dims in {names}")

    def combinations(self) -> Iterator[SubModel]:
        """Every combination of levels, duplicates included."""
        names = [d.name for d in self.dims]
        for combo in itertools.product(*(d.levels for d in self.dims)):
            yield SubModel(tuple(zip(names, combo)))

    def __iter__(self) -> Iterator[SubModel]:
        return (sub for sub in self.combinations() if sub not in self.duplicates)

    def __len__(self) -> int:
        n = 1
        for d in self.dims:
            n *= len(d.levels)
        return n - len(self.duplicates)

    def distinct(self, resolve: Callable[[SubModel], Hashable]) -> "Grid":
        """This grid without duplicates: combinations whose ``resolve(sub)`` (the physical slices they
        select, e.g. every sliced layer's output size and the depth units kept) are equal are one
        sub-model; the largest combination of each group stays (the last in grid order, since
        levels ascend)."""
        groups: dict[Hashable, list[SubModel]] = {}
        for sub in self.combinations():
            groups.setdefault(resolve(sub), []).append(sub)
        dropped = {sub: same[-1] for same in groups.values() for sub in same[:-1]}
        return Grid(self.dims, dropped)

    def canonical(self, sub: SubModel) -> SubModel:
        """The member that computes ``sub`` (``sub`` itself unless it was dropped as a duplicate)."""
        return self.duplicates.get(sub, sub)

    def duplicates_note(self) -> str:
        """E.g. ``"24 distinct sub-models (8 duplicates dropped: heads 0.75 = 1)"``: which levels
        turned out to select the same slices."""
        n = f"{len(self)} distinct sub-models"
        if not self.duplicates:
            return n
        same = []
        for dropped, kept in self.duplicates.items():
            for d in self.dims:
                a, b = dropped[d.name], kept[d.name]
                if a != b and f"{d.name} {_fmt(a)} = {_fmt(b)}" not in same:
                    same.append(f"{d.name} {_fmt(a)} = {_fmt(b)}")
        return f"{n} ({len(self.duplicates)} duplicates dropped: {', '.join(same)})"

    def submodels(self) -> list[SubModel]:
        return list(self)

    @property
    def largest(self) -> SubModel:
        return SubModel(tuple((d.name, d.levels[-1]) for d in self.dims))

    @property
    def smallest(self) -> SubModel:
        return self.canonical(SubModel(tuple((d.name, d.levels[0]) for d in self.dims)))

    def along_counts(self, sub: SubModel) -> list[SubModel]:
        """``sub`` at every level of the count dims (depth), its other levels unchanged."""
        counts = [d for d in self.dims if d.kind == COUNT]
        out = []
        for combo in itertools.product(*(d.levels for d in counts)):
            levels = dict(sub.levels) | dict(zip((d.name for d in counts), combo))
            member = self.canonical(SubModel(tuple((d.name, levels[d.name]) for d in self.dims)))
            if member not in out:
                out.append(member)
        return out

    def parse(self, name: str) -> SubModel:
        """The sub-model with this stable name (as printed by ``sortednet submodels``); the name of a
        dropped duplicate gives the member that computes the same."""
        for sub in self.combinations():
            if sub.name == name:
                return self.canonical(sub)
        raise KeyError(name)

    def make(self, levels: Mapping[str, float | int]) -> SubModel:
        """A grid member from a ``{dim: level}`` mapping (missing dims at their largest level)."""
        out = []
        for d in self.dims:
            v = levels.get(d.name, d.largest)
            if v not in d.levels:
                raise KeyError(f"{d.name}={v} is not a level of the grid ({list(d.levels)})")
            out.append((d.name, v))
        return self.canonical(SubModel(tuple(out)))
