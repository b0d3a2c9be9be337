# make bench / make test create .venv when missing and (re)install the project when
# pyproject.toml changes; everything then runs from .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BNFF := $(VENV)/bin/bnff
# results/<machine>/: CPU model and core count, e.g. amd-epyc-2c
MACHINE = $(shell $(VENV)/bin/python -c "import os, re; from bnff.measure.machine import cpu_model; \
	print(re.sub('[^a-z0-9]+', '-', cpu_model().lower()).strip('-') + '-%dc' % os.cpu_count())")
BENCH_ARGS ?= densenet121 resnet50 --batch 16 --image 224 --repeat 3

.PHONY: install bench report test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "bnff-bench needs Python 3.10 or newer; set PYTHON=/path/to/python3.x"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

bench: $(STAMP)
	$(BNFF) bench $(BENCH_ARGS) --csv results/$(MACHINE)/bench.csv --resume
	$(BNFF) report

report: $(STAMP)
	$(BNFF) report

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
