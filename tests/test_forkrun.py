"""The tests' CLI calls run forked from a server with torch imported (``forkrun.py``): each must come out as
``python -m sortedcli.cli`` run fresh would, exit status, stdout and stderr alike."""

from __future__ import annotations

import subprocess
import sys

import forkrun
from conftest import CLI_ENV, TINY

CASES = {
    "help": ["--help"],
    "refused-before-torch": ["export", "--budget", "2"],
    "refused-after-torch": ["train", *TINY, "trainer.max_steps=1", "model.pretrained=/nowhere/at/all"],
    "unknown-verb": ["trian"],
}


def _plain(args, cwd, env):
    return subprocess.run([sys.executable, "-m", "sortedcli.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_forked_call_is_what_a_fresh_interpreter_prints_and_returns(tmp_path):
    for case, args in CASES.items():
        folder = tmp_path / case  # each writes nothing: the same folder, so that paths in messages match
        folder.mkdir()
        forked, plain = forkrun.run(args, folder, CLI_ENV, 300), _plain(args, folder, CLI_ENV)
        assert (forked.returncode, forked.stdout, forked.stderr) == (plain.returncode, plain.stdout, plain.stderr), case
        assert forked.returncode in (0, 2) and not any(folder.iterdir()), (case, forked.stderr)


def test_a_forked_call_has_its_own_folder_environment_and_exit_status(tmp_path):
    """A run written where the call ran; the call's environment, not the server's (sortedcli reads
    SORTEDNET_CONF when it is imported, in the call); an import-time variable that differs runs it plainly."""
    p = forkrun.run(["train", *TINY, "trainer.max_steps=1", "paths.runs=elsewhere"], tmp_path, CLI_ENV, 300)
    assert p.returncode == 0, p.stderr
    assert list((tmp_path / "elsewhere").glob("*/checkpoints/latest"))
    bad = forkrun.run(["train", *TINY], tmp_path, {**CLI_ENV, "SORTEDNET_CONF": "/no/such/conf"}, 300)
    assert bad.returncode == 2 and "/no/such/conf" in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert forkrun._sensitive({**CLI_ENV, "OMP_NUM_THREADS": "2"}) != forkrun._sensitive(CLI_ENV)
