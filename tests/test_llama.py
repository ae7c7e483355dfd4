"""LLaMA on the nesting mechanism: transformers' own LlamaForCausalLM sorted along depth (exits through
its own final norm and LM head), GQA-proportional heads and ffn; SoFT's every-exit loss from one
trunk pass; HF export that loads without sortedcli; the CLI end to end (train, eval, export, generate)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import cli, explain, run_folders
from sortedcli import decoding as D
from sortedcli.data import build_data, lm
from sortedcli.engine import Distill, train_step
from sortedcli.models import create, entry
from sortedcli.models.decoder import DecoderStack, truncated
from sortedcli.nest import SubModel, check_equal, extract, run_exits, use
from sortedcli.sampling import create_sampler
from sortedcli.nest import COUNT, Dim, Grid

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
CORPUS = ["The cat sat on the mat. The dog sat on the log. " * 4,
          "Two plus three is five, and five plus five is ten. " * 4,
          "A question gets an answer; an answer ends the example. " * 4] * 4
QA = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
      for a in range(6) for b in range(3)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe") / "tok"
    lm.train_tokenizer(CORPUS, 300, folder)
    return folder


@pytest.fixture(scope="module")
def data(tokenizer_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("qa") / "qa.json"
    path.write_text(json.dumps(QA))
    return build_data({"name": "alpaca", "path": str(path), "test_fraction": 0.2, "max_length": 128},
                      AutoTokenizer.from_pretrained(str(tokenizer_dir)))


@pytest.fixture
def model(data):
    torch.manual_seed(0)
    return create("llama", **data.model_args, config=dict(TINY)).eval()


def batch_of(data, n=4):
    return data.collate([data.train[i] for i in range(n)])


def test_sorted_llama_keeps_transformers_keys_and_the_tokenizers_vocabulary(data, model):
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(model.config)
    assert set(model.state_dict()) == set(plain.state_dict())
    assert model.config.vocab_size == len(data.tokenizer) == 300
    assert model.config.eos_token_id == data.tokenizer.eos_token_id
    assert data.task.name in entry("llama").tasks


def test_gqa_heads_keep_key_value_heads_and_their_query_groups_in_proportion(data, model):
    sub = SubModel.of(heads=0.5)
    widths = {}

    def hook(name):
        def record(m, args, out):  # returns None: a forward hook's return value replaces the output
            widths.setdefault(name, out.shape[-1])
        return record

    attn = model.model.layers[0].self_attn
    hooks = [getattr(attn, n).register_forward_hook(hook(n)) for n in ("q_proj", "k_proj", "v_proj")]
    with torch.no_grad(), use(model, sub):
        model(**data.task.inputs(batch_of(data)))
    for h in hooks:
        h.remove()
    head_dim = attn.head_dim
    assert widths == {"q_proj": 2 * head_dim, "k_proj": 1 * head_dim, "v_proj": 1 * head_dim}  # 4/2 -> 2/1
    small = extract(model, SubModel.of(depth=3, heads=0.5, ffn=0.5), data.example())
    assert (small.config.num_hidden_layers, small.config.num_attention_heads, small.config.num_key_value_heads,
            small.config.intermediate_size, small.config.head_dim) == (3, 2, 1, 32, head_dim)
    assert check_equal(model, SubModel.of(depth=3, heads=0.5, ffn=0.5), small, data.task.inputs(batch_of(data))) < 1e-5


def test_the_export_check_runs_padded_multi_token_inputs_and_catches_wrong_queries_and_keys(data, model, tmp_path):
    from transformers import AutoModelForCausalLM

    from sortedcli.models import hf

    check = data.task.check_input(data.test, data.collate)
    mask = check["attention_mask"]
    assert mask.shape[0] >= 2 and (mask.sum(1) > 1).all() and (mask == 0).any()  # several tokens, padding
    sub = SubModel.of(depth=3, heads=0.5)
    small = extract(model, sub, data.example())
    assert check_equal(model, sub, small, check) < 1e-5
    with torch.no_grad():
        want = small.eval()(**check).logits
        g = torch.Generator().manual_seed(0)
        for layer in small.model.layers:  # queries and keys replaced by random numbers
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=g))
    check_equal(model, sub, small, data.example())  # one token: softmax over one key is 1, this passes
    with pytest.raises(AssertionError):
        check_equal(model, sub, small, check)
    with pytest.raises(RuntimeError, match="does not reproduce"):  # the saved folder is checked the same way
        hf.save(tmp_path / "hf", small, {}, check, want, AutoModelForCausalLM)


def test_every_exit_from_one_trunk_pass_is_the_truncated_model(data, model):
    inputs = data.task.inputs(batch_of(data))
    with torch.no_grad():
        exits = run_exits(model, inputs, [1, 2, 3, 4])
        for k in (1, 2, 3):
            want = truncated(model, k)(**inputs).logits
            torch.testing.assert_close(exits[k], want, rtol=1e-5, atol=1e-5)
            with use(model, SubModel.of(depth=k)):
                torch.testing.assert_close(model(**inputs).logits, want, rtol=1e-5, atol=1e-5)


def test_soft_loss_is_the_mean_of_every_exits_response_only_cross_entropy(data, model):
    grid = Grid((Dim("depth", COUNT, (1, 2, 3, 4)),))
    batch = batch_of(data)
    subs = create_sampler("all", grid).step()
    with torch.no_grad():
        exits = run_exits(model, data.task.inputs(batch), [1, 2, 3, 4])
        labels = batch["labels"][:, 1:].reshape(-1)
        want = sum(F.cross_entropy(exits[k][:, :-1].reshape(-1, exits[k].shape[-1]), labels, ignore_index=-100)
                   for k in (1, 2, 3, 4)) / 4
    assert (labels != -100).sum() < labels.numel() - (batch["attention_mask"][:, 1:] == 0).sum()  # prompts masked
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = train_step(model.train(), data.task, subs, batch, optimizer, grid.largest, Distill(), torch.device("cpu"), None)
    assert loss == pytest.approx(float(want), rel=1e-5)


def test_soft_reads_the_exits_out_at_answer_positions_only_with_the_dense_gradient(data, model):
    """The head (here a quarter of SmolLM2) runs at the positions whose next token counts, not at
    every position of every exit; loss and gradient equal the dense every-position computation."""
    grid = Grid((Dim("depth", COUNT, (1, 2, 3, 4)),))
    batch = batch_of(data)
    counted = int(data.task.counted(batch))
    assert counted < batch["labels"].numel() // 2  # prompts and padding are most of the positions
    subs = create_sampler("all", grid).step()
    model.train()
    model.zero_grad()
    inputs = data.task.inputs(batch)
    exits = run_exits(model, inputs, [1, 2, 3, 4])
    labels = batch["labels"][:, 1:].reshape(-1)
    dense = sum(F.cross_entropy(exits[k][:, :-1].reshape(-1, exits[k].shape[-1]), labels, ignore_index=-100)
                for k in (1, 2, 3, 4)) / 4
    dense.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1].numel()))
    try:
        loss = train_step(model, data.task, subs, batch, torch.optim.SGD(model.parameters(), lr=0.0), grid.largest,
                          Distill(), torch.device("cpu"), None)
    finally:
        hook.remove()
    assert sorted(rows) == [counted] * 4  # every exit and the full model at the counted places (one chunk here)
    assert loss == pytest.approx(float(dense.detach()), rel=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulated_micro_batches_give_the_gradient_and_loss_of_one_pass(data, model):
    """``accumulate=2``: the two halves have different numbers of answer tokens; weighted by their share,
    the accumulated gradient (and the reported losses) are those of the whole batch at once."""
    grid = Grid((Dim("depth", COUNT, (1, 2, 3, 4)),))
    batch = batch_of(data)
    row = batch["labels"][0]
    row[(row != -100).nonzero()[:3, 0]] = -100  # fewer answer tokens in the first half
    halves = data.task.split(batch, 2)
    assert data.task.counted(halves[0]) < data.task.counted(halves[1])
    subs = create_sampler("all", grid).step()
    results = []
    for accumulate in (1, 2):
        model.zero_grad()
        seen = []
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_step(model.train(), data.task, subs, batch, optimizer, grid.largest, Distill(),
                          torch.device("cpu"), None, observe=lambda s, v: seen.append(v), accumulate=accumulate)
        results.append((loss, seen[0], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss1, per1, grads1), (loss2, per2, grads2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-5) and per2 == pytest.approx(per1, rel=1e-5)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_decoding_runs_on_a_sorted_model_and_reads_sub_model_widths(data, model):
    stack = DecoderStack(model)
    prompt = data.tokenizer(lm.alpaca_prompt("What is 1 plus 2?")).input_ids
    full = D.generate(stack, prompt, max_new_tokens=10).tokens
    assert D.speculative(stack, prompt, draft_exit=2, max_new_tokens=10).tokens == full
    with use(model, SubModel.of(heads=0.5)):  # fewer heads: decoding follows the scope like a forward
        narrow = D.generate(stack, prompt, max_new_tokens=10).tokens
        ids = torch.tensor([prompt])
        for t in narrow:
            with torch.no_grad():
                assert int(model(ids).logits[0, -1].argmax()) == t
            ids = torch.cat([ids, torch.tensor([[t]])], 1)


@pytest.mark.slow
def test_cli_trains_evaluates_exports_and_generates_with_a_tiny_llama(tokenizer_dir, tmp_path):
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    tiny = ["model=llama_tiny", f"model.tokenizer={tokenizer_dir}", "data=alpaca", f"data.path={tmp_path / 'qa.json'}",
            "data.test_fraction=0.2", "dims=[depth]", "sampler=all", "optim=adamw", "trainer.batch_size=4",
            "trainer.max_steps=3", "eval.batch_size=8"]
    p = cli(["train", *tiny], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "runs")[0]
    p = cli(["eval", "--all-submodels"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    rows = json.loads((run / "eval" / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert len(rows) == 4 and all(r["perplexity"] > 1 for r in rows)
    p = cli(["export", "--budget", "1"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    folder = run / "export" / "budget-1"
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()
    # The export loads with the stock class in a process where sortedcli cannot be imported.
    code = ("import sys; sys.modules['sortedcli'] = None\n"
            "try:\n    import sortedcli\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('sortedcli imported')\n"
            "import json, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
            f"t = AutoTokenizer.from_pretrained({str(folder)!r})\n"
            "ids = [t('What is 2 plus 2?').input_ids, t('Two').input_ids]\n"
            "n = max(map(len, ids))\n"
            "mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])\n"
            "ids = torch.tensor([i + [t.pad_token_id] * (n - len(i)) for i in ids])\n"
            "with torch.no_grad():\n"
            "    print(json.dumps({'ids': ids.tolist(), 'mask': mask.tolist(),\n"
            "                      'logits': m(input_ids=ids, attention_mask=mask).logits.tolist()}))")
    q = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert q.returncode == 0, q.stderr[-2000:]
    meta = json.loads((folder / "sortednet.json").read_text())
    depth = meta["submodel"].get("depth") or 4
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == depth
    # ... and gives the trained sorted model's sub-model logits on a padded batch of two prompts
    from sortedcli import runs
    from sortedcli.build import build_model, plain

    got = json.loads(q.stdout.strip().splitlines()[-1])
    weights, run_cfg = runs.load_weights(runs.resolve_checkpoint(None, tmp_path / "runs")[1])
    sorted_model = build_model(run_cfg, lm.model_args(entry("llama").tokenizer(plain(run_cfg.model))))
    sorted_model.load_state_dict(weights)
    ids, mask = torch.tensor(got["ids"]), torch.tensor(got["mask"])
    assert (mask == 0).any()
    with torch.no_grad(), use(sorted_model.eval(), SubModel(tuple(meta["submodel"].items()))):
        want = sorted_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=1e-4, atol=1e-4)
    # generate: plain greedy and self-speculative print the same text; an impossible exit is one line
    texts = []
    for flags in ([], ["--speculative", "--draft-exit", "2"], ["--early-exit"]):
        g = cli(["generate", *flags, "--max-tokens", "12", "What is 2 plus 2?"], cwd=tmp_path)
        assert g.returncode == 0, explain(g)
        texts.append(g.stdout)
        assert "tokens/s" in g.stderr
    assert texts[0] == texts[1]
    # the export answers in the format its run trained on (the Alpaca template; it fell back to the raw prompt)
    same = [cli(["generate", *flags, "--max-tokens", "12", "What is 2 plus 2?"], cwd=tmp_path)
            for flags in (["--exit", str(depth)], ["--ckpt", folder])]
    assert all(g.returncode == 0 for g in same) and same[0].stdout == same[1].stdout, explain(same[1])
    bad = cli(["generate", "--exit", "9", "hello"], cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "exit must be in 1..4" in bad.stderr


def test_submodels_reports_the_model_that_train_builds(tokenizer_dir, tmp_path):
    """`sortednet submodels` sizes the LLaMA with the tokenizer's vocabulary, as train does (not the
    config's default 32k), and counts FLOPs on the input eval and export count them on: its table
    equals the counts of the model train builds, measured on the data's own example."""
    import io

    from hydra import compose, initialize_config_dir
    from rich.console import Console

    from sortedcli.build import build_data, build_grid, build_model
    from sortedcli.cli import CONF_DIR
    from sortedcli.commands import submodels
    from sortedcli.flops import measure

    (tmp_path / "qa.json").write_text(json.dumps(QA))
    overrides = ["model=llama_tiny", f"model.tokenizer={tokenizer_dir}", "data=alpaca",
                 f"data.path={tmp_path / 'qa.json'}", "data.test_fraction=0.2", "dims=[depth,heads,ffn]"]
    with initialize_config_dir(config_dir=str(CONF_DIR.resolve()), version_base="1.3"):
        listed = compose(config_name="submodels", overrides=overrides)
        trained = compose(config_name="train", overrides=overrides)
    rows = submodels.run(listed, Console(file=io.StringIO()))
    data, _ = build_data(trained)
    model = build_model(trained, data.model_args)
    grid = build_grid(trained, model)
    assert [r["name"] for r in rows] == [s.name for s in grid] and len(rows) == 32  # 64 combinations, 32 distinct (4/2 heads)
    for row, sub in zip(rows, grid):
        cost = measure(model, sub, data.example())
        assert (row["params"], row["flops"]) == (cost.params, cost.flops), sub


def test_submodels_of_a_llama_without_data_uses_the_models_own_data(tokenizer_dir, tmp_path):
    """Without data= the default (images) does not fit a language model: submodels sizes it for its
    registry entry's data set instead of ending in a traceback."""
    p = cli(["submodels", "model=llama_tiny", f"model.tokenizer={tokenizer_dir}", "dims=[depth,heads]"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    assert "llama_tiny: 8 sub-models (depth 4 x heads 4), per token (data=hamlet)" in p.stdout  # 16, 8 distinct
    from omegaconf import OmegaConf

    from sortedcli.cli import CONF_DIR
    from sortedcli.report import human

    options = {**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "model" / "llama_tiny.yaml")),
               "tokenizer": str(tokenizer_dir)}
    tokenizer = entry("llama_tiny").tokenizer(options)
    full = create(options.pop("name"), **lm.model_args(tokenizer), **options)
    row = next(line for line in p.stdout.splitlines() if " depth4-heads1 " in line)
    assert f" {human(sum(t.numel() for t in full.parameters()))} " in row, row


def test_own_text_agreement_counts_the_full_models_own_greedy_answer(data, model):
    """eval chooses the draft on the text drafts meet: the full model's greedy continuation of a
    held-out prompt, teacher-forced. Each exit's agreement there is the fraction of continuation tokens
    it predicts (the full model itself: 1), computed by hand from one pass."""
    from sortedcli import decoding, draft
    from sortedcli.commands.eval import sample_prompt

    stack = entry("llama_tiny").stack(model)
    prompts = [sample_prompt(data.test[i]) for i in range(3)]
    got = draft.own_text_agreement(model, stack, data.task, prompts, [1, 2, 3], torch.device("cpu"), None,
                                   new_tokens=6)
    hits = dict.fromkeys((1, 2, 3), 0)
    with torch.no_grad():
        for p in prompts:
            cont = decoding.generate(stack, p, max_new_tokens=6).tokens
            ids = torch.tensor([p + cont])
            out = run_exits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [1, 2, 3, 4])
            assert out[4][0, len(p) - 1:-1].argmax(-1).tolist() == cont  # the full model's own answer
            for e in (1, 2, 3):
                hits[e] += int((out[e][0, len(p) - 1:-1].argmax(-1) == torch.tensor(cont)).sum())
    assert got == pytest.approx({(e, None): hits[e] / (6 * len(prompts)) for e in (1, 2, 3)})


def test_exit_agreement_gathered_at_answer_positions_equals_the_dense_count(data, model):
    """eval's agreement reads the exits out at the counted positions only (memory: a 49k head at every
    position of 10 exits ran a 24 GB machine out); the fractions equal the every-position count, with
    the full head and over a draft vocabulary."""
    from sortedcli import draft
    from sortedcli.tasks import IGNORE

    batches = [batch_of(data, 4), data.collate([data.train[i] for i in range(4, 8)])]
    vocab = torch.arange(0, 300, 3)
    got = draft.agreement(model, data.task, [1, 2, 3], batches, torch.device("cpu"), None, {100: vocab})
    want = {}
    with torch.no_grad():
        for e in (1, 2, 3):
            for n in (None, 100):
                hits = total = 0
                for batch in batches:
                    out = run_exits(model, data.task.inputs(batch), [e, 4])
                    z, ref = out[e][:, :-1], out[4][:, :-1].argmax(-1)
                    pick = z.argmax(-1) if n is None else vocab[z[..., vocab].argmax(-1)]
                    keep = batch["labels"][:, 1:] != IGNORE
                    hits += int((pick == ref)[keep].sum())
                    total += int(keep.sum())
                want[e, n] = hits / total
    assert got == pytest.approx(want)


def test_eval_scores_every_exit_from_one_trunk_pass_as_each_sub_model_alone(data, model):
    """eval's perplexity of the exits of one stack comes from one pass of their trunk (SmolLM2's 10
    exits: one forward per batch, not 10 of 3..30 layers), equal to scoring each sub-model alone."""
    from sortedcli.engine import score, score_members
    from sortedcli.nest import trunk_groups

    grid = Grid((Dim("depth", COUNT, (1, 2, 3, 4)),))
    subs = grid.submodels()
    loader = [batch_of(data, 4), data.collate([data.train[i] for i in range(4, 8)])]
    ((trunk, members),) = trunk_groups(model, subs)
    got = score_members(model, data.task, trunk, members, loader, torch.device("cpu"), None)
    for sub in subs:
        assert got[sub] == pytest.approx(score(model, data.task, sub, loader, torch.device("cpu"), None), rel=1e-5)


def test_a_run_keeps_its_own_copy_of_model_tokenizer_so_a_tokenizer_retrained_in_place_changes_nothing(
        tokenizer_dir, tmp_path):
    import shutil

    mine = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, mine)
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    tiny = ["model=llama_tiny", f"model.tokenizer={mine}", "data=alpaca", f"data.path={tmp_path / 'qa.json'}",
            "data.test_fraction=0.2", "dims=[depth]", "sampler=all", "trainer.batch_size=4", "trainer.max_steps=1"]
    p = cli(["train", *tiny], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
    run = run_folders(tmp_path / "runs")[0]
    assert (run / "tokenizer" / "tokenizer.json").read_text() == (mine / "tokenizer.json").read_text()

    def results():  # each sub-model's perplexity and agreement, what the tokenizer's split decides
        p = cli(["eval", "--all-submodels", "eval.latency.reps=1"], cwd=tmp_path)
        assert p.returncode == 0, explain(p)
        rows = json.loads((run / "eval" / "results.json").read_text())
        return [(r["perplexity"], r.get("agreement")) for r in (rows["rows"] if isinstance(rows, dict) else rows)]

    before = results()
    shutil.rmtree(mine)  # the user trains another tokenizer under the same path: another vocabulary
    lm.train_tokenizer([c.upper() for c in CORPUS], 280, mine)
    assert results() == before
    p = cli(["generate", "What is 1 plus 1?", "--max-tokens", "2"], cwd=tmp_path)
    assert p.returncode == 0, explain(p)
