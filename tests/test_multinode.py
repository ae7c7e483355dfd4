"""Several machines: two torchrun "nodes" of one process each, on this machine, through the rendezvous
torchrun uses across machines (``--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT``).

Each node is its own ``torchrun`` started in a folder of its own, as on two machines; which of them
gets rank 0 is the rendezvous's choice. The run is the 1-process tiny run of ``trained_run``, split
over 2 processes (global batch 64: 32 each), so the weights must be that run's. Two disk layouts:

- **shared**: both nodes see every folder (a shared filesystem, as on a cluster);
- **separate**: each node sees the other's folder as an empty read-only disk (run in a mount namespace
  of its own: ``unshare --mount``, where this machine allows it): the node that did not get rank 0
  must write nothing and must not need rank 0's files.

What this does not test: a real network between machines, NCCL, and more than one process per node
(docs/multi-node.md says so).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import CLI_ENV, TINY, run_folders

NODES = ("node-a", "node-b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_hide_folders() -> bool:
    """Whether this machine lets a process see a folder of its own over another (a private mount namespace)."""
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    try:
        probe = ["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o ro none /mnt"]
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_node(root: Path, name: str, port: int, run_id: str, separate: bool, extra: list) -> subprocess.Popen:
    """One node: ``torchrun --nnodes 2 --nproc-per-node 1 ... -m sortedcli train TINY`` in ``root/name``."""
    here = root / name
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
               "--max-restarts", "0", "-m", "sortedcli", "train", *TINY, "trainer.sync_batchnorm=true", *extra]
    if separate:  # the other node's folder: an empty disk this node cannot write to
        (other,) = (root / n for n in NODES if n != name)
        command = ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o ro none '{other}' && exec \"$@\"", "sh",
                   *command]
    with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:
        return subprocess.Popen(command, cwd=here, env={**CLI_ENV, "TMPDIR": str(root / "tmp")}, stdout=out,
                                stderr=err, start_new_session=True)


def _weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


@pytest.mark.parametrize("disks, given", [("shared", None), ("separate", None), ("separate", "runs/given")],
                         ids=["shared", "separate", "separate-hydra.run.dir"])
def test_two_nodes_through_a_c10d_rendezvous_train_the_one_process_run(disks, given, trained_run, tmp_path):
    """``given``: the same ``hydra.run.dir`` on both nodes (relative: each node's own folder): rank 0's is
    the run, the other node makes none."""
    if disks == "separate" and not _can_hide_folders():
        pytest.skip("this machine has no private mount namespaces (unshare --mount) to give each node its own disk")
    for folder in (*NODES, "tmp"):
        (tmp_path / folder).mkdir()
    port, run_id = _free_port(), f"sortednet-{uuid.uuid4().hex[:8]}"
    extra = [] if given is None else [f"hydra.run.dir={given}"]
    nodes = [_start_node(tmp_path, name, port, run_id, disks == "separate", extra) for name in NODES]
    try:
        codes = [node.wait(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    said = {name: ((tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()) for name in NODES}
    words = {name: " ".join(out.split()) for name, (out, _) in said.items()}  # the console wraps long lines
    assert codes == [0, 0], "\n".join(f"--- {n}: exit {c}\n{o[-2000:]}\n{e[-3000:]}"
                                      for (n, (o, e)), c in zip(said.items(), codes))

    (run,) = run_folders(tmp_path)  # one run folder, written by rank 0's node, in its own folder
    (first,) = [n for n in NODES if (tmp_path / n) in run.parents]
    (second,) = [n for n in NODES if n != first]
    assert given is None or run == tmp_path / first / given
    assert not any((tmp_path / second).iterdir())  # the other node wrote nothing, not even a folder
    assert not list((tmp_path / "tmp").glob("sortednet-rank-*"))  # rank 1's Hydra scratch folder is gone
    assert "x 2 processes (global batch 64)" in words[first]
    assert "trained 4 steps" in words[first] and not words[second].strip()  # rank 0 speaks, the other is quiet

    mine, alone = _weights(run), _weights(trained_run)
    assert mine.keys() == alone.keys()
    worst = max((mine[k].float() - alone[k].float()).abs().max().item() for k in mine)
    assert worst <= 1e-5, f"the 2-node weights differ from the 1-process run's by up to {worst}"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == \
        len((trained_run / "metrics.jsonl").read_text().splitlines())  # written once
