"""The SortedNet mechanism, free of Hydra, the CLI and printing.

- :mod:`.space`: sub-models as values and the grid of them;
- :mod:`.layers`: prefix-sliced Conv2d / Linear / BatchNorm sharing one scope per model;
- :mod:`.convert`: library model -> sorted model in place; ``with use(model, sub):`` selects;
  ``run_exits`` reads every depth exit of a stack from one forward pass;
- :mod:`.extract`: sub-model -> plain smaller library model, checked equal;
- :mod:`.batchnorm`: per-sub-model BatchNorm recalibration; folding BatchNorm into convolutions.
"""

from .batchnorm import batchnorm_kept, fold_batchnorm, has_batchnorm, recalibrate, synchronize
from .convert import DepthUnit, Nesting, call, has_exits, nesting, resolved, run_exits, sortify, trunk_groups, use
from .extract import check_equal, extract, trace
from .layers import Scope, sorted_size
from .space import COUNT, FRACTION, Dim, Grid, SubModel

__all__ = [
    "COUNT", "FRACTION", "DepthUnit", "Dim", "Grid", "Nesting", "Scope", "SubModel", "batchnorm_kept", "call",
    "check_equal", "extract", "fold_batchnorm", "has_batchnorm", "has_exits", "nesting", "recalibrate", "resolved",
    "run_exits", "sortify", "sorted_size", "synchronize", "trace", "trunk_groups", "use",
]
