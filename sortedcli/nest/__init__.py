"""The SortedNet mechanism, free of Hydra, the CLI and printing.

- :mod:`.space`: sub-models as values and the grid of them;
- :mod:`.layers`: prefix-sliced Conv2d / Linear / BatchNorm sharing one scope per model;
- :mod:`.convert`: library model -> sorted model in place; ``with use(model, sub):`` selects;
  ``run_exits`` reads every depth exit of a stack from one forward pass; ``add_exit_readouts`` gives
  exits their own readout modules;
- :mod:`.extract`: sub-model -> plain smaller library model, checked equal;
- :mod:`.batchnorm`: per-sub-model BatchNorm recalibration; folding BatchNorm into convolutions.
"""

from .batchnorm import batchnorm_kept, fold_batchnorm, has_batchnorm, recalibrate, synchronize
from .convert import (EXITS, DepthUnit, Nesting, add_exit_readouts, call, has_exits, nesting, read_exit, reading,
                      resolved, run_exits, sortify, trunk_groups, use)
from .extract import check_equal, extract, trace
from .layers import Scope, sorted_size
from .space import COUNT, FRACTION, Dim, Grid, SubModel

__all__ = [
    "COUNT", "EXITS", "FRACTION", "DepthUnit", "Dim", "Grid", "Nesting", "Scope", "SubModel", "add_exit_readouts",
    "batchnorm_kept", "call", "check_equal", "extract", "fold_batchnorm", "has_batchnorm", "has_exits", "nesting",
    "read_exit", "reading", "recalibrate", "resolved", "run_exits", "sortify", "sorted_size", "synchronize", "trace",
    "trunk_groups", "use",
]
