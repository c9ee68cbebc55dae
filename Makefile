# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: an unpinned torch makes pip fetch a multi-GB CUDA build
# where a CPU wheel is what this machine needs (set TORCH_SPEC for a GPU node).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
CONSTRAINTS := infra/docker/constraints.txt
PYTEST_ARGS ?=

.PHONY: setup demo test bench docs clean ui

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile "$(TORCH_SPEC)"
	# DS_BUILD_OPS=0: DeepSpeed builds its ops just in time, so installing needs no compiler step.
	# The constraints pin the tested stack (the image installs the same), so a release upstream
	# changes nothing here until the file is regenerated (see its header).
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-compile -c $(CONSTRAINTS) -e ".[test]"
	# pip byte-compiles one file at a time (90 s of the install on 2 cores); compileall uses every
	# core (61 s in all). Like pip, it leaves the packages' non-Python templates uncompiled (and
	# says so: output and status ignored).
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/orchestrator run jobs/quickstart.yaml
	# An Alpaca-format prompt: the instruction, a newline, the input.
	$(VENV)/bin/orchestrator generate models:/quickstart@candidate \
		"$$(printf 'Describe the animal.\nI saw a brown owl at the river.')"

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The benchmarks against HF Trainer and a plain script (2 cores: 15 minutes, 889 s on 2026-12-06),
# and data at scale (300,000 generated records; about 7 minutes, 6.5 on 2026-12-06); both rewrite their part of docs/benchmarks.md.
bench: $(STAMP)
	$(PY) benchmarks/run.py
	$(PY) benchmarks/data_scale.py

# The job file reference, generated from the spec's pydantic models (tests/test_docs.py checks it).
docs: $(STAMP)
	$(PY) -m orchestrator.spec.reference --write docs/job-file.md

ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf runs mlartifacts mlflow.db .pytest_cache
