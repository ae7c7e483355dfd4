"""Construction without copies: under ``trainer.strategy=fsdp`` a pretrained decoder is built on the meta
device, sharded with FSDP2 before any weight exists, and each rank allocates its own shards only; rank 0
reads the safetensors files one at a time and broadcasts them (``distributed.load_pretrained``).

Checked on 2 gloo processes with tiny LLaMAs saved in several safetensors shards (untied and tied
embeddings): every exit's logits equal those of the model one process builds eagerly, a tied head is
still the embedding's parameter, the rotary frequencies (a buffer no checkpoint holds) are recomputed,
and each rank's resident memory grows by its shards plus at most one file, not by the model.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sortedcli import distributed, models

from conftest import CLI_ENV, TINY, cli, explain

VOCAB = 300
# about 63 MB of fp32 weights, 4 layers of ~16 MB saved in files of at most 9 MB: the model is several
# times the largest file, so a per-rank copy of it and a bound of "shards + one file" are told apart
BIG = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8,
       "num_key_value_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": False}
SMALL_TIED = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": True}

WORKER = r'''
import json, sys
import torch, torch.distributed as dist
from sortedcli import distributed, models
from sortedcli.nest import SubModel, use

dist.init_process_group("gloo")
torch.set_num_threads(1)
d = distributed.Dist(rank=dist.get_rank(), world=dist.get_world_size())
entry = models.entry("llama")
ids = torch.randint(0, int(sys.argv[3]), (2, 11), generator=torch.Generator().manual_seed(0))
report = {}
for folder in sys.argv[1].split(","):
    model, files = entry.build_empty(vocab_size=int(sys.argv[3]), pretrained=folder)
    assert len(files) >= 2 and all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    ties = distributed.tied(model)
    distributed.shard(model)
    loaded = distributed.load_pretrained(model, files, torch.device("cpu"), entry.init_buffers, ties, d)
    model.eval()
    with torch.no_grad():
        logits = {"full": model(input_ids=ids).logits}
        for k in range(1, model.config.num_hidden_layers + 1):
            with use(model, SubModel.of(depth=k)):
                logits[k] = model(input_ids=ids).logits
    if d.main:
        torch.save(logits, folder + "/fsdp_logits.pt")
        report[folder] = {"files": loaded.files, "largest": loaded.largest, "growths": loaded.growths,
                          "bytes": distributed.weight_bytes(model), "ties": ties,
                          "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                          "inv_freq": model.model.rotary_emb.inv_freq.tolist()}
    del model, logits
if d.main:
    open(sys.argv[2], "w").write(json.dumps(report))
distributed.shutdown()
'''


def _save(folder: Path, config: dict, shard: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **config)).save_pretrained(str(folder), max_shard_size=shard)
    return folder


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Both folders loaded by 2 gloo processes (one launch): ``(folders, the worker's report)``."""
    home = tmp_path_factory.mktemp("meta")
    big, tied = _save(home / "big", BIG, "9MB"), _save(home / "tied", SMALL_TIED, "40KB")
    (home / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**CLI_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(home / "worker.py"), f"{big},{tied}", str(home / "report.json"),
                               str(VOCAB)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    return big, tied, json.loads((home / "report.json").read_text())


def _eager_logits(folder: Path) -> dict:
    """The model one process builds (what ``sortednet train`` builds without FSDP), every exit's logits."""
    from sortedcli.nest import SubModel, use

    model = models.create("llama", vocab_size=VOCAB, pretrained=str(folder)).eval()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = {"full": model(input_ids=ids).logits}
        for k in range(1, model.config.num_hidden_layers + 1):
            with use(model, SubModel.of(depth=k)):
                out[k] = model(input_ids=ids).logits
    return out, model


@pytest.mark.parametrize("which", ["big", "tied"])
def test_the_meta_built_sharded_model_gives_the_eager_models_logits_at_every_exit(loaded, which):
    big, tied, report = loaded
    folder = big if which == "big" else tied
    want, eager = _eager_logits(folder)
    got = torch.load(folder / "fsdp_logits.pt", weights_only=True)
    assert set(got) == set(want) and len(want) == eager.config.num_hidden_layers + 1
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=0), (k, (got[k] - want[k]).abs().max())
    assert len({tuple(v[0, -1, :5].tolist()) for k, v in want.items() if k != "full"}) == len(want) - 1  # exits differ
    r = report[str(folder)]
    assert r["inv_freq"] == eager.model.rotary_emb.inv_freq.tolist()
    assert r["files"] == len(list(folder.glob("*.safetensors"))) >= 2
    if which == "tied":  # one parameter under two names, loaded once from the embedding's key
        assert r["tied"] and r["ties"] == [["model.embed_tokens.weight", "lm_head.weight"]]
    else:
        assert not r["tied"] and r["ties"] == []


def test_each_rank_grows_by_its_shards_and_one_file_not_by_the_model(loaded):
    """Rank 0 holds its half of the weights plus the one file it is broadcasting; rank 1 its half plus
    the tensor being received. A rank that built the whole model (the eager path) grows by at least all
    of it: 63 MB here, against a largest file of 9 MB."""
    big, _, report = loaded
    r = report[str(big)]
    model, largest = r["bytes"], r["largest"]
    assert model > 5 * largest
    for rank, grown in enumerate(r["growths"]):
        assert grown is not None, "VmHWM could not be reset (/proc/self/clear_refs)"
        assert grown < model / 2 + largest + 8 * 2**20, (rank, grown / 2**20, model / 2**20, largest / 2**20)
        assert grown < 0.85 * model
    print(f"\nmodel {model / 2**20:.1f} MiB in {r['files']} files (largest {largest / 2**20:.1f} MiB); "
          f"host memory growth per rank: {', '.join(f'{g / 2**20:.1f} MiB' for g in r['growths'])}")


def test_what_cannot_stream_is_built_eagerly(tmp_path):
    """No meta build where the weights are not a local folder of safetensors or would be permuted while
    loading (importance sorting needs a whole layer), and the files' keys are checked against the model's
    (a LoRA model's adapters are in no pretrained file)."""
    folder = _save(tmp_path / "hf", SMALL_TIED, "40KB")
    entry = models.entry("llama")
    assert entry.build_empty(vocab_size=VOCAB, pretrained="some-org/some-model") is None
    assert entry.build_empty(vocab_size=VOCAB, pretrained=str(folder), importance="l1") is None
    model, files = entry.build_empty(vocab_size=VOCAB, pretrained=str(folder))
    assert distributed.uncovered(model, files) == []
    assert distributed.uncovered(model, files[:1])  # a file missing: its keys are not covered
    lora, _ = entry.build_empty(vocab_size=VOCAB, pretrained=str(folder), lora={"r": 2})
    assert any("lora_A" in k for k in distributed.uncovered(lora, files))
    assert models.entry("resnet_tiny").build_empty(num_classes=10, in_channels=1) is None


def test_fsdp_on_one_process_is_refused_in_one_line_and_writes_nothing(tmp_path):
    p = cli(["train", *TINY, "trainer.strategy=fsdp", "hydra.run.dir=run"], cwd=tmp_path)
    assert p.returncode == 2, explain(p)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "trainer.strategy=fsdp" in lines[0] and "trainer.devices=N" in lines[0], explain(p)
    assert not (tmp_path / "run").exists()


def test_train_builds_a_pretrained_model_without_copies_and_its_checkpoint_holds_the_weights(tmp_path):
    """``sortednet train`` on 2 FSDP processes from a local pretrained folder (tied, 3 safetensors files):
    built on the meta device, said on the console; its step-0 checkpoint holds the pretrained weights."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sortedcli import runs
    from sortedcli.data import lm
    from test_llama import CORPUS, QA

    lm.train_tokenizer(CORPUS, 300, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    folder = tmp_path / "pretrained"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), **{**SMALL_TIED, "max_position_embeddings": 256})  # the chats' length
    LlamaForCausalLM(config).save_pretrained(str(folder), max_shard_size="40KB")
    tok.save_pretrained(str(folder))
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    p = cli(["train", "model=llama", f"model.pretrained={folder}", "data=alpaca", f"data.path={tmp_path / 'qa.json'}",
             "data.test_fraction=0.2", "dims=[depth]", "sampler=all", "optim=sgd", "trainer.batch_size=4",
             "trainer.max_steps=0", "trainer.devices=2", "trainer.strategy=fsdp", "hydra.run.dir=run"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "built on the meta device" in p.stdout and "x 2 processes (FSDP)" in p.stdout, explain(p)
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) >= 2
    want = {k: v for f in files for k, v in load_file(str(f)).items()}
    got, _ = runs.load_weights(runs.latest_checkpoint(tmp_path / "run"))
    assert set(want) <= set(got)
    for k, v in want.items():
        assert torch.equal(got[k].float(), v.float()), k
    if "lm_head.weight" in got:
        assert torch.equal(got["lm_head.weight"], want["model.embed_tokens.weight"])
