"""Start-up: what is refused or printed before torch is imported, and what a vision run never imports.
How long that takes is measured by benchmarks/startup.py (whole processes), not here."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import CLI_ENV, TINY


def imported_after(code: str, cwd) -> dict:
    """Run ``code`` in a fresh interpreter; it sets ``out``; returns it with the heavy modules loaded."""
    script = (f"import json, sys\n{code}\n"
              "out['loaded'] = [m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules]\n"
              "print(json.dumps(out))")
    p = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=CLI_ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]) | {"stdout": p.stdout, "stderr": p.stderr}


def test_a_rejected_budget_is_refused_before_torch_is_imported(tmp_path):
    out = imported_after("from sortedcli.cli import main\nout = {'code': main(['export', '--budget', '2'])}",
                         tmp_path)
    assert out["code"] == 2 and out["loaded"] == []
    assert out["stderr"].strip() == ("sortednet: error: --budget must be a fraction of the full model's FLOPs in "
                                     "(0, 1], got 2")


def test_a_bad_trainer_setting_is_refused_before_torch_is_imported(tmp_path):
    out = imported_after("from sortedcli.cli import main\n"
                         f"out = {{'code': main({['train', *TINY, 'trainer.batch_size=-1']!r})}}", tmp_path)
    assert out["code"] == 2 and out["loaded"] == []
    assert "trainer.batch_size must be an integer >= 1, got -1" in out["stderr"]


def test_bad_eval_settings_are_refused_before_torch_is_imported(tmp_path):
    """eval's and export's own eval.* settings, checked before the run is looked for or torch loaded (a
    run need not exist: the mistake is in the command)."""
    cases = {("eval", "eval.batch_size=0"): "eval.batch_size must be an integer >= 1, got 0",
             ("eval", "eval.test_subset=abc"): "eval.test_subset must be a positive integer",
             ("export", "eval.latency.reps=0"): "eval.latency.reps must be"}
    for args, words in cases.items():
        out = imported_after(f"from sortedcli.cli import main\nout = {{'code': main({list(args)!r})}}", tmp_path)
        assert out["code"] == 2 and out["loaded"] == [], (args, out)
        assert words in out["stderr"] and len(out["stderr"].strip().splitlines()) == 1, (args, out["stderr"])


def test_train_prints_its_run_folder_first_before_torch_is_imported(tmp_path):
    """The first line names the run folder; a hook on the import of torch shows it came before."""
    out = imported_after(
        "import builtins\nfrom sortedcli.cli import main\n"
        "order, real = [], builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name == 'torch' and 'torch' not in sys.modules: order.append('torch')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
        "write = sys.stdout.write\n"
        "sys.stdout.write = lambda s: (order.append(s) if s.strip() else None, write(s))[1]\n"
        f"code = main(['train', *{TINY!r}])\n"
        "builtins.__import__ = real\nsys.stdout.write = write\n"
        "out = {'code': code, 'order': order[:2]}", tmp_path)
    assert out["code"] == 0, out["stderr"][-2000:]
    first, then = out["order"]
    runs = sorted((tmp_path / "runs").iterdir())
    assert first == f"sortednet: training resnet_tiny on digits -> {runs[0]}" and then == "torch"


def test_the_registry_imports_an_adapter_only_for_the_model_it_builds(tmp_path):
    heavy = "[m for m in ('torch', 'torchvision', 'transformers') if m in sys.modules]"
    out = imported_after(f"from sortedcli import models\nout = {{'registry': {heavy}}}\n"
                         f"models.entry('llama').dims\nout['llama_dims'] = {heavy}\n"
                         "models.create('resnet_tiny', num_classes=10, in_channels=1)", tmp_path)
    assert out["registry"] == []  # the registry alone: no torch
    assert "transformers" not in out["llama_dims"]  # LLaMA's dims: its adapter, not transformers
    assert out["loaded"] == ["torch", "torchvision"]  # a vision model built: no transformers
