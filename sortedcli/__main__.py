"""``python -m sortedcli VERB ...`` (and ``torchrun --nproc-per-node N -m sortedcli train ...``)."""

import os
import sys

from .cli import main

try:
    code = main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if e.code is not None and not isinstance(e.code, int):
        print(e.code, file=sys.stderr)
if os.environ.get("SORTEDNET_LAUNCHER_PID") and "RANK" in os.environ:
    # a rank of `trainer.devices=N`: its work is done, its files written and its process group destroyed;
    # the interpreter's teardown of torch.distributed's native threads can still abort ("terminate called
    # without an active exception", seen once in 3 runs on 2 gloo ranks), which would fail a finished run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
