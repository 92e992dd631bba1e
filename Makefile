# One command each: every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest demo bench clean mutate

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check cbtasks workers tests bench
	$(BIN)/ruff format --check cbtasks workers tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/python -m cbtasks.ops.demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info

# Mutation testing of the core, the policy, the fallbacks, the clients and the
# deferral logic against the fast tests ([tool.mutmut] in pyproject.toml); not
# part of make test. Prints the score and the surviving mutants.
mutate: $(STAMP)
	rm -rf mutants
	CBTASKS_MUTATION=1 $(BIN)/mutmut run --max-children 2 || true
	$(BIN)/mutmut export-cicd-stats
	$(BIN)/mutmut results
	$(BIN)/python -m tests.mutation_score
