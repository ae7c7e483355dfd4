"""TensorBoard event files beside ``metrics.jsonl``, so ``tensorboard --logdir runs/`` compares runs.

The train loop hands every metrics record it writes to :class:`TensorBoardLog` as well; records map
to scalars by key (``loss`` -> ``train/loss``, ``lr`` -> ``train/lr``, ``acc_largest`` ->
``eval/acc_largest``, ...), at the record's optimizer step. ``trainer.tensorboard=false`` turns it
off (nothing is imported or written then). A resumed run purges events after the step it resumes
from, so the curves do not fork.
"""

from __future__ import annotations

from pathlib import Path

#: metrics-record key -> TensorBoard tag
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "acc_largest": "eval/acc_largest",
        "acc_smallest": "eval/acc_smallest"}


class TensorBoardLog:
    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        step = int(record["step"])
        for key, tag in TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
