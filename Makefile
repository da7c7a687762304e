# flexo — the two commands a newcomer needs:  `make demo` (the whole pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Everything offline, quiet and inside the project (ENV.md).
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export DS_ACCELERATOR := cpu
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export PREFECT_HOME := $(CURDIR)/.cache/prefect
export DVC_SITE_CACHE_DIR := $(CURDIR)/.cache/dvc-site
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HOME := $(CURDIR)/.cache/hf
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install browser demo test test-all dvc-init table clean-outputs bench bench-growth bench-serve playground-shot dp-experts ablation ceiling privacy-stats scale

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: the CPU wheel on disk, not a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -e '.[test,gpu]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium and ChromeDriver for the playground's browser test (tests/flexo/test_playground.py).
# Installed where we are root and apt works (as in CI); elsewhere that one test is skipped, saying why.
browser:
	@command -v chromedriver >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; }; } || \
	  echo "make: no chromium/chromedriver (needs root and apt): the playground browser test will be skipped"

dvc-init: install
	test -d .dvc || dvc init -q
	dvc config core.analytics false
	dvc config core.check_update false
	dvc config --local core.site_cache_dir $(CURDIR)/.cache/dvc-site

# REPRO_FLAGS=-f reruns every stage (a from-scratch timing for `make bench`).
demo: dvc-init
	@mkdir -p .cache && date +%s > .cache/demo.started
	dvc repro $(REPRO_FLAGS)
	@echo "{\"started\": $$(cat .cache/demo.started), \"finished\": $$(date +%s)}" > .cache/demo_wall.json
	@cat results/table.md 2>/dev/null || true

# Speed and memory, side by side with the plain baseline of each step (bench/run.py; ~7 min on 2 cores).
# BENCH_BEFORE: the commit whose merge is timed as "before" (the last merge through torch, before the byte-level one).
BENCH_BEFORE ?= b6dd0bd
# On a fresh clone it first builds what the timed steps need (public model, code owner's data: ~3 min).
bench: dvc-init
	dvc repro train_public embed@code
	$(BIN)/python bench/run.py --before $(BENCH_BEFORE)

# How flexo's costs grow with the owners: 4, 16 and 64 synthetic owners from the demo's artifacts (bench/growth.py; ~10 min, after `make demo`).
bench-growth: install
	$(BIN)/python bench/growth.py

# `flexo serve` under load: 200 requests, 8 concurrent, mixed exclusions, beside FlexoServer called directly
# (bench/serve_load.py → docs/bench/serve-<date>.md; ~5 min, after `make demo`).
bench-serve: install
	$(BIN)/python bench/serve_load.py

# docs/playground.png: the playground page in headless Chromium, serving models/merged-rt (after `make demo`).
playground-shot: install browser
	$(BIN)/python bench/playground_screenshot.py

# What DP-SGD costs the experts: ε ∈ {∞, 8, 2}, bpb, extraction and membership AUC (experiments/dp_experts.py →
# docs/dp_experts.md; ~40 min on 2 cores, after `make demo`; writes nothing in models/ or results/).
dp-experts: install
	$(BIN)/python experiments/dp_experts.py

# The routing ablation of results/ablation.md (~40 min; needs `make demo` first for the public model).
ablation: install
	$(BIN)/python experiments/ablation.py

# Where the merged model loses to BTM and how far any linear router could go (~10 min, after `make demo`).
ceiling: install
	$(BIN)/python experiments/routing_ceiling.py

# The demo at ~4x scale beside the demo (configs/scale4x.yaml, a scratch project under .cache/scale/; ~2 h on
# 2 cores, after `make demo`): table, routing ceiling and separability at both sizes → docs/scale.md.
scale: install
	$(BIN)/python experiments/scale.py run configs/scale4x.yaml
	$(BIN)/python experiments/scale.py demo
	$(BIN)/python experiments/scale.py render

# What (ε, δ)-DP and low-rank router statistics cost the default model, and the bytes each owner ships
# (docs/router_stats_privacy.md; ~1 h on 2 busy cores, after `make demo`; writes nothing in models/, results/).
privacy-stats: install
	$(BIN)/python experiments/router_stats_privacy.py

test: install browser
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install browser
	$(BIN)/python -m pytest -q

clean-outputs:
	rm -rf data/curated models results
