# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench paper peers clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel first, so nothing below pulls in a CUDA build of torch.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nexus-moe run configs/tiny.yaml

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/moe_layer.py
	$(BIN)/python benchmarks/moe_vs_hf.py --quick --experts 4 16 --threads 1
	$(BIN)/python benchmarks/train_moe_vs_dense.py --threads 1 --dtypes fp32
	$(BIN)/python benchmarks/generation.py --threads 1 --sizes tiny
	$(BIN)/python benchmarks/upcycle_memory.py
	$(BIN)/python benchmarks/upcycle_vs_mergekit.py --mergekit-bin $(or $(MERGEKIT_MOE),/tmp/mk-venv/bin/mergekit-moe)

paper: $(STAMP)
	$(BIN)/nexus-moe run configs/paper-small.yaml
	$(BIN)/nexus-moe report runs/paper-small/results/scores.json --out docs/results.md

# After `make paper`: every training-free peer router against nexus on the study's experts,
# with man pages from this machine as the user's domain (BENCHMARKS.md, "Training-free peer
# routers"); writes the comparison table into README.md.
peers: $(STAMP)
	test -d runs/local-domains/manpages || $(BIN)/python benchmarks/local_domains.py --out runs/local-domains --domains manpages
	$(BIN)/python benchmarks/peer_routers.py --data runs/local-domains --json runs/peers/peers.json --markdown runs/peers/peers.md --readme README.md

clean-venv:
	rm -rf $(VENV)
