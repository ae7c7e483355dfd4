"""Shared fixtures for the end-to-end CLI tests: one tiny trained run, reused by eval/export tests.

``TINY`` are the overrides of ``sortednet train`` that make a run take seconds on a CPU: the 78k
parameter ``resnet_tiny`` on scikit-learn's in-memory 8x8 digits, 256 training images (4 steps of
64), a 3 widths x 4 depths = 12 sub-model grid. ``TINY_EVAL`` is the part of it that ``eval`` and
``export`` accept (their configs have no model/data/trainer sections).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import forkrun
import pytest

from sortedcli.cli import register_resolvers

register_resolvers()  # ${fresh:...} and ${package:...}, as the CLI registers them

TINY_EVAL = ["eval.calib_batches=2", "eval.calib_batch_size=64", "eval.test_subset=64"]
TINY = ["model=resnet_tiny", "data=digits", "trainer.epochs=1", "trainer.batch_size=64",
        "data.train_subset=256", "data.test_subset=64", *TINY_EVAL, "dims.width.levels=[0.25,0.5,1.0]"]
TINY_STEPS = 4  # 256 training images / batch 64, one epoch
TINY_GRID = 12  # widths [0.25, 0.5, 1.0] x depths 1..4 of resnet_tiny

# One torch thread per CLI process: tiny models are fastest that way, and several CLI processes (and
# whatever else runs on the machine) do not fight over the cores (with the default thread count an
# 8-step resnet_tiny run took 22 s instead of 0.3 s on a busy 2-core machine).
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
CLI_ENV.pop("HYDRA_FULL_ERROR", None)


def cli(args, cwd, timeout=300, env=None) -> subprocess.CompletedProcess:
    """``sortednet ARGS`` as a process of its own, run in ``cwd`` with ``env`` (``CLI_ENV``); stdout/stderr
    captured as text. Forked from a server that has torch imported already (``forkrun.py``;
    ``SORTEDNET_TEST_FORK=0``: a fresh interpreter each time)."""
    return forkrun.run(args, cwd, CLI_ENV if env is None else env, timeout)


def wait_for_checkpoint(root: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll until a ``checkpoints/latest`` matching ``root.glob(pattern)`` appears or ``proc`` ends."""
    import time

    deadline = time.monotonic() + timeout
    while not list(root.glob(pattern)) and proc.poll() is None:
        assert time.monotonic() < deadline, f"no checkpoint within {timeout:.0f} s"
        time.sleep(0.01)


def pytest_configure(config):
    """A pytest-xdist worker ignores SIGINT (its controller handles Ctrl-C), and an ignored signal is
    inherited by the processes it starts: a ``sortednet`` started by a test would never see a Ctrl-C. A
    user's terminal delivers it, so the worker takes Python's own handler back (children then start with
    the default, as from a shell)."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def explain(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


def selected_cases(request, module: str, cases: dict) -> tuple[list[str], Path | None]:
    """The ``case`` parameters of the tests of ``module`` selected in this session, and the trained run
    when one of them needs it (its home kind starting with "run"): for table-driven CLI cases that a
    module-scoped fixture runs concurrently."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.module.__name__ == module and "case" in getattr(getattr(item, "callspec", None), "params", {})]
    needs_run = any(str(cases[c][1]).startswith("run") for c in wanted)
    return wanted, (request.getfixturevalue("trained_run") if needs_run else None)


def each_refused(cases: dict, run) -> None:
    """``run(case) -> (CompletedProcess, its folder)`` for every case of ``cases`` (``{case: (args, the
    words its one line must hold)}``), two at a time (most of a CLI call is importing torch): each is one
    line, exit 2, no traceback, and wrote nothing into its folder."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(cases, pool.map(run, cases)))
    for case, (p, folder) in done.items():
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2 and len(lines) == 1 and cases[case][1] in lines[0], (case, explain(p))
        assert "Traceback" not in p.stderr and not any(folder.iterdir()), case


def run_folders(runs_root: Path) -> list[Path]:
    """The run folders under ``runs_root`` that hold a complete checkpoint."""
    return sorted(p.parent.parent for p in Path(runs_root).glob("**/checkpoints/latest"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not fight the other processes for the cores:
    a module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny run trained by ``sortednet train`` (in the session folder's runs/); its folder."""
    home = tmp_path_factory.mktemp("trained")
    p = cli(["train", *TINY], cwd=home)
    assert p.returncode == 0, explain(p)
    runs = run_folders(home / "runs")
    assert len(runs) == 1, runs
    return runs[0]
