"""LoRA SoFT (issue 22 item 5, ``model.lora``): peft's LoRA adapters on a sorted LLaMA. Only the
adapters train (the optimizer holds nothing else, base weights stay as built); every exit still reads
out through the shared final norm and LM head; eval, generate and export merge the adapters (export
writes a folder the stock class reloads, giving the sub-model's logits); checkpoints stay one
safetensors file and resume; a width dim whose projections carry adapters is refused in one line."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import cli, explain, run_folders
from test_mistakes import snapshot
from sortedcli.data import build_data, lm
from sortedcli.errors import UsageError
from sortedcli.models import create
from sortedcli.nest import SubModel, check_equal, extract, run_exits, use

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
CORPUS = ["The cat sat on the mat. The dog sat on the log. " * 4,
          "Two plus three is five, and five plus five is ten. " * 4] * 6
QA = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
      for a in range(6) for b in range(3)]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A folder with a tiny BPE tokenizer (tok/) and an instructions file (qa.json)."""
    folder = tmp_path_factory.mktemp("lora")
    lm.train_tokenizer(CORPUS, 300, folder / "tok")
    (folder / "qa.json").write_text(json.dumps(QA))
    return folder


def _train_args(home, *extra):
    return ["train", "model=llama_tiny", f"model.tokenizer={home / 'tok'}", "data=alpaca",
            f"data.path={home / 'qa.json'}", "data.test_fraction=0.2", "dims=[depth]", "sampler=all", "optim=adamw",
            "optim.lr=0.01", "trainer.batch_size=4", "trainer.epoch_eval=false", "eval.batch_size=8",
            "model.config.hidden_size=32", "model.config.intermediate_size=64", *extra]


def test_only_the_adapters_train_and_merging_them_keeps_every_exit(home):
    """One SoFT step (every exit's loss): the optimizer holds the adapters only, the base weights are
    unchanged and the adapters moved; merged (peft's merge), every exit gives what it gave with the
    adapters beside the weights, and a cut-out depth sub-model is a plain model again."""
    from transformers import AutoTokenizer

    from sortedcli.build import build_optimizer
    from sortedcli.engine import Distill, train_step
    from sortedcli.models.decoder import merge_lora
    from omegaconf import OmegaConf

    data = build_data({"name": "alpaca", "path": str(home / "qa.json"), "test_fraction": 0.2, "max_length": 256},
                      AutoTokenizer.from_pretrained(str(home / "tok")))
    torch.manual_seed(0)
    model = create("llama_tiny", **data.model_args, config=dict(TINY), lora=dict(LORA))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 4  # A and B of q_proj and v_proj in 4 layers
    q_proj = [k for k in model.state_dict() if ".q_proj." in k]  # the base weight beside A and B
    assert {k.split(".q_proj.")[1] for k in q_proj} == {"base_layer.weight", "lora_A.default.weight",
                                                        "lora_B.default.weight"}
    optim = build_optimizer(OmegaConf.create({"optim": {"name": "adamw", "lr": 0.05, "weight_decay": 0.1}}), model)
    held = {id(p) for g in optim.param_groups for p in g["params"]}
    assert held == {id(p) for n, p in model.named_parameters() if n in names}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = data.collate([data.train[i] for i in range(4)])
    subs = [SubModel.of(depth=k) for k in (1, 2, 3, 4)]
    model.train()
    for _ in range(2):
        train_step(model, data.task, subs, batch, optim, subs[-1], Distill(), torch.device("cpu"), None)
    after = model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all("lora_" in k for k in moved)  # base weights, norms, head: unchanged
    assert any("lora_B" in k for k in moved)  # B starts at zero: the adapters now change the function

    model.eval()
    with torch.no_grad():
        exits = run_exits(model, batch["input_ids"], [1, 2, 3, 4])
        merge_lora(model)
        assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())
        merged = run_exits(model, batch["input_ids"], [1, 2, 3, 4])
    for k in exits:
        torch.testing.assert_close(merged[k], exits[k], rtol=1e-4, atol=1e-4)
    small = extract(model, SubModel.of(depth=2), batch["input_ids"][:1])
    check_equal(model, SubModel.of(depth=2), small, batch["input_ids"])
    assert small.config.num_hidden_layers == 2 and not any("lora" in k for k in small.state_dict())


def test_a_width_dim_nests_with_adapters_off_its_projections(home):
    """ffn slices gate/up/down_proj: with adapters on q_proj/v_proj it nests (forward at ffn 0.5); heads
    slices q/k/v/o_proj and is not offered with them."""
    from sortedcli.models import entry

    torch.manual_seed(0)
    model = create("llama_tiny", vocab_size=300, config=dict(TINY), lora=dict(LORA))
    family = entry("llama_tiny")
    assert set(family.dims_of(model)) == {"depth", "ffn"}
    assert "q_proj, v_proj" in family.why_not(model, "heads")
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad(), use(model.eval(), SubModel.of(ffn=0.5, depth=3)):
        assert model(ids).logits.shape == (2, 7, 300)
    on_mlp = create("llama_tiny", vocab_size=300, config=dict(TINY), lora={**LORA, "targets": ["down_proj"]})
    assert set(family.dims_of(on_mlp)) == {"depth", "heads"}
    off = create("llama_tiny", vocab_size=300, config=dict(TINY), lora={**LORA, "r": None})  # the default: no adapters
    assert not hasattr(off, "sortednet_lora") and all(p.requires_grad for p in off.parameters())
    for bad, says in [({"r": "abc"}, "model.lora.r must be null (no adapters) or an integer >= 1"),
                      ({"r": 4, "dropout": 1.5}, "model.lora.dropout must be a number in [0, 1)"),
                      ({"r": 4, "targets": []}, "model.lora.targets must be a list of")]:
        with pytest.raises(UsageError, match=re.escape(says)):
            create("llama_tiny", vocab_size=300, config=dict(TINY), lora=bad)


def test_the_plan_holds_every_weight_and_trains_the_adapters(home):
    """``sortednet plan`` with model.lora: the parameters row holds every weight (the frozen base too),
    gradients and optimizer state only the adapters (it counted the adapters alone as the parameters)."""
    from hydra import compose, initialize_config_dir

    from sortedcli.cli import CONF_DIR
    from sortedcli.commands.plan import estimate

    overrides = ["model=llama_tiny", f"model.tokenizer={home / 'tok'}", "data=alpaca", "data.path=unused.json",
                 "data.max_length=64", "dims=[depth]", "sampler=all", "optim=adamw", "trainer.batch_size=2",
                 "trainer.precision=fp32", "model.config.hidden_size=32", "model.config.intermediate_size=64"]
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        full = compose(config_name="plan", overrides=overrides)
        lora = compose(config_name="plan", overrides=[*overrides, "model.lora.r=4"])
    base, _, _ = estimate(full)
    plan, _, meta = estimate(lora)
    adapters = 4 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))  # 4 layers x (q_proj 32 -> 32, v_proj 32 -> 16) at r = 4
    assert plan.params == base.params + adapters and plan.trainable == adapters and base.trainable is None
    assert plan.parameters == 4 * plan.params
    assert plan.gradients == 4 * adapters and plan.optimizer == 2 * 4 * adapters


@pytest.mark.slow
def test_lora_soft_trains_evals_every_exit_resumes_generates_and_exports_a_merged_folder(home, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from sortedcli import runs
    from sortedcli.build import build_model, plain
    from sortedcli.models import entry

    (tmp_path / "qa.json").write_text(json.dumps(QA))
    p = cli(_train_args(home, "model.lora.r=4", "trainer.max_steps=2"), cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    # adapters beside random frozen weights: trained, and said (a pretrained model is what LoRA is for)
    assert "model.lora trains only the adapters, and this model's frozen weights are random" in p.stdout
    run = run_folders(tmp_path / "runs")[0]
    # a safetensors checkpoint holding the base weights and the adapters; the optimizer knows the adapters only
    ckpt = runs.latest_checkpoint(run)
    with safe_open(str(ckpt / runs.MODEL_FILE), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("q_proj.lora_A.default.weight") for k in keys)
    assert any(k.endswith("q_proj.base_layer.weight") for k in keys)
    state = runs.load_state(ckpt)
    assert len(state["optimizer"]["state"]) == 2 * 2 * 4
    # resumable: one more step from the checkpoint
    p = cli(["train", "--resume", str(run), "trainer.max_steps=3"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert runs.step_of(runs.latest_checkpoint(run)) == 3
    # eval measures every exit (adapters merged)
    p = cli(["eval", "--all-submodels", "eval.latency.reps=1", "eval.latency.warmup=0"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    rows = json.loads((run / "eval" / "results.json").read_text())["rows"]
    assert sorted(r["dims"]["depth"] for r in rows) == [1, 2, 3, 4] and all(r["perplexity"] > 1 for r in rows)
    g = cli(["generate", "--max-tokens", "4", "What is 2 plus 2?"], cwd=tmp_path)
    assert g.returncode == 0, explain(g)
    # export: the adapters merged, the sub-model cut out; the stock class reloads it with its logits
    p = cli(["export", "--budget", "0.9", "force=true"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    folder = run / "export" / "budget-0.9"
    meta = json.loads((folder / "sortednet.json").read_text())
    sub = SubModel(tuple(meta["submodel"].items()))
    assert sub.get("depth") < 4  # an exit, read out through the shared final norm and head
    stock = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(stock).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k or "base_layer" in k for k in stock.state_dict())
    assert stock.config.num_hidden_layers == (sub.get("depth") or 4)
    weights, run_cfg = runs.load_weights(runs.latest_checkpoint(run))
    sorted_model = build_model(run_cfg, lm.model_args(entry("llama_tiny").tokenizer(plain(run_cfg.model))))
    sorted_model.load_state_dict(weights)  # the adapters beside the weights, not merged
    assert getattr(sorted_model, "sortednet_lora", None)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3], [7, 8, 250, 12, 1, 2]])
    with torch.no_grad(), use(sorted_model.eval(), sub):
        want = sorted_model(ids).logits
        got = stock(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# the user's LoRA mistakes: one line, exit status 2, nothing written (run concurrently)
MISTAKES = {
    "heads": (["model.lora.r=4", "dims=[depth,heads]"],
              "cannot be sorted along 'heads' (LlamaForCausalLM: its LoRA adapters on q_proj, v_proj run at full width"),
    "target-head": (["model.lora.r=4", "model.lora.targets=[lm_head]"], "model.lora.targets must be a list of"),
    "ffn": (["model.lora.r=4", "model.lora.targets=[q_proj,down_proj]", "dims=[depth,ffn]"],
            "cannot be sorted along 'ffn' (LlamaForCausalLM: its LoRA adapters on down_proj run at full width"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_a_lora_mistake_is_one_line(case, lora_mistakes):
    p, before, after = lora_mistakes[case]
    assert p.returncode == 2, explain(p)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("sortednet: error: "), explain(p)
    assert MISTAKES[case][1] in p.stderr, explain(p)
    assert before == after


@pytest.fixture(scope="module")
def lora_mistakes(home, tmp_path_factory):
    def one(case):
        where = tmp_path_factory.mktemp(case)
        before = snapshot(where)
        p = cli(_train_args(home, *MISTAKES[case][0], "trainer.max_steps=1"), cwd=where)
        return p, before, snapshot(where)

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(sorted(MISTAKES), pool.map(one, sorted(MISTAKES))))
