"""``python -m sortedcli VERB ...`` (and ``torchrun --nproc-per-node N -m sortedcli train ...``)."""

from .cli import entry

entry()
