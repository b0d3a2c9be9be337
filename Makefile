# make bench / make test create .venv when missing and (re)install the project when
# pyproject.toml changes; everything then runs from .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BNFF := $(VENV)/bin/bnff
# results/<machine>/: CPU model, LLVM CPU name and core count, e.g. amd-epyc-znver4-2c
MACHINE = $(shell $(VENV)/bin/python -c "from bnff.measure.machine import machine_name; \
	print(machine_name())")
BENCH_ARGS ?= densenet121 resnet50 --batch 16 --image 224 --repeat 3
# PyTorch (the `pytorch` schedule and micro's `torch` variant) is installed unless
# BNFF_NO_TORCH=1; the extras and the stamp follow that choice, so switching reinstalls.
comma := ,
EXTRAS := test,plot$(if $(BNFF_NO_TORCH),,$(comma)torch)

.PHONY: install bench report test clean

install: $(STAMP)

# the stamp is stale when pyproject.toml changed or it was made with other extras
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(EXTRAS))
.PHONY: $(STAMP)
endif
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "bnff-bench needs Python 3.10 or newer; set PYTHON=/path/to/python3.x"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[$(EXTRAS)]'
	echo '$(EXTRAS)' > $(STAMP)

bench: $(STAMP)
	$(BNFF) bench $(BENCH_ARGS) --csv results/$(MACHINE)/bench.csv
	$(BNFF) report

report: $(STAMP)
	$(BNFF) report

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
