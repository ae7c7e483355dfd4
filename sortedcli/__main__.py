"""``python -m sortedcli VERB ...`` (and ``torchrun --nproc-per-node N -m sortedcli train ...``)."""

import sys

from .cli import main

sys.exit(main())
