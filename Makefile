# make bench / make test create .venv when missing and (re)install the project when
# pyproject.toml changes; everything then runs from .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BNFF := $(VENV)/bin/bnff

.PHONY: install bench test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "bnff-bench needs Python 3.10 or newer; set PYTHON=/path/to/python3.x"; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

bench: $(STAMP)
	$(BNFF) check densenet121 --batch 2 --image 64 --schedule reference
	$(BNFF) check resnet50 --batch 2 --image 64 --schedule reference

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
