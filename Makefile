# prunelab: `make quickstart` installs and runs a real experiment offline; `make test` installs and tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-slow test-scripts lint lint-imports check-results docs clean

# The dependencies' exact versions come from constraints.txt (pyproject.toml gives ranges).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing prunelab and its dependencies into $(VENV) (a few minutes the first time)..."
	$(PY) -m pip install --quiet --progress-bar off -c constraints.txt -e '.[dev]' > $(VENV)/pip.log 2>&1 \
		|| { grep -v "^WARNING: Location" $(VENV)/pip.log; exit 1; }
	$(PY) -c "import prunelab, torch, lightning, hydra, torch_pruning, timm"
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/prunelab experiment=l1_filter_resnet20_digits_quickstart

# One test process per core (at most 4), each with one torch thread so that they do not oversubscribe
# the cores (measured on 2 cores: 8.6 min of pytest instead of 19.8 serially with torch's threads).
TEST_PROCESSES ?= auto --maxprocesses 4

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_PROCESSES)

# The tests marked slow (over about 30 s each on an idle 2-core machine), deselected by `make test`; CI runs both.
test-slow: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_PROCESSES) -m slow

# The checks of the tools in benchmarks/ and of the paper checks in experiments/ (not library code: the suite
# above imports none of them).
test-scripts: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q benchmarks experiments

# The layers of the code ([tool.importlinter] in pyproject.toml): a module imports only from the layers below it.
# ruff's rules and its formatter (pyproject.toml's [tool.ruff]) over the code, the tests, the benchmarks and the
# experiments, then mypy over src/prunelab ([tool.mypy]). Measured on the 2-core machine, 2026-12-07: 27 s with no
# .mypy_cache (mypy is nearly all of it), 0.8 s with it.
# .pre-commit-config.yaml runs the same checks before each commit (`pre-commit install`).
LINT_PATHS := src tests benchmarks experiments docs/hooks
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

lint-imports: install
	$(VENV)/bin/lint-imports

# Each method's quick configuration on the shared real data, its figures beside tests/reference_results.json
# (about 9 minutes on an idle 2-core machine; ONLY=pfs_quick,jackpot for some).
check-results: install
	$(PY) -m prunelab.guard --reference tests/reference_results.json --shared ../shared $(if $(ONLY),--only $(ONLY))

# The documentation site from docs/ and the public API's docstrings; --strict fails on a broken link or page.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

clean:
	rm -rf $(VENV) outputs site
