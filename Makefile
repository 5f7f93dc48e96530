# Two entry points, each setting itself up on a fresh machine:
#   make quickstart   generate shapes, train the quick detector, evaluate, write demo images
#   make test         run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detkit-installed
RUN := work_dirs/quickstart_$(shell date +%Y%m%d-%H%M%S)

.PHONY: quickstart test install clean-venv

install: $(STAMP)

$(STAMP): setup.py requirements-torch.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m detkit train configs/faster_rcnn/quickstart_shapes.yaml --out $(RUN)
	$(PY) -m detkit demo --checkpoint $(RUN)/model_final.pt --out $(RUN)/demo \
		"$${DETKIT_DATA:-datasets}/shapes/JPEGImages/test_0000*.png"
	@echo "quick start done: $(RUN) (eval.json, metrics.jsonl, demo/*.png)"

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
