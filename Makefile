# ASE-MLLM pipeline. Every target calls the `ase-mllm` CLI; the venv bootstraps itself.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CLI := $(VENV)/bin/ase-mllm
DATASET ?=
DS := $(or $(DATASET),demo)
RUN ?=
RUN_ARG := $(if $(RUN),--run-name $(RUN),)

.PHONY: setup demo study test bench ingest saliency finetune report serve status clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(CLI) demo

study: $(STAMP)
	$(CLI) study --dataset $(or $(DATASET),demo-study)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 -n 2 --dist loadfile

bench: $(STAMP)
	$(CLI) bench

ingest: $(STAMP)
	$(CLI) ingest $(DS)

saliency: $(STAMP)
	$(CLI) saliency $(if $(DATASET),--dataset $(DATASET),)

finetune: $(STAMP)
	$(CLI) finetune --dataset $(DS) $(RUN_ARG)

report: $(STAMP)
	$(CLI) report --dataset $(DS) $(RUN_ARG)

serve: $(STAMP)
	$(CLI) serve $(if $(DATASET),--dataset $(DATASET),) $(RUN_ARG) $(if $(PORT),--port $(PORT),)

status: $(STAMP)
	$(CLI) status

clean:
	rm -rf work
