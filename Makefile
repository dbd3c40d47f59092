# The README's two commands. Both create .venv from requirements.txt when it is missing
# (torch first, from its pinned CPU/CUDA wheel, so pip never swaps in another build).
PY ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-sft test venv clean

# requirements-download.txt: img2dataset (prepare_data.py --download), installed without its
# webdataset<0.3 pin, which clashes with ours (see the file).
$(STAMP): requirements.txt requirements-download.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$$(grep -E '^torch==' requirements.txt)"
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-download.txt
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	./launch.sh

# Instruction tuning of the finished demo (LLaVA-format conversations, held-out VQA before/after).
demo-sft: demo
	$(PYTHON) tools/demo_sft.py

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf runs/demo data/demo runs/demo_sft data/demo_sft
