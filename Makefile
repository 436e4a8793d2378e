# unparrot: `make demo` and `make test` set up (or refresh) .venv from pinned constraints, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
# llama-cpp-python compiles from source once (~8 min); a portable build lets pip reuse its cached wheel.
export CMAKE_ARGS := -DGGML_NATIVE=OFF

.PHONY: venv demo test test-fast lint bench browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all,test]"
	# peer tools for tests/test_peer_tools.py, without their conflicting or unused pins (constraints.txt)
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt img2dataset clip_benchmark
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/unparrot demo --out demo-out

# Headless Chromium for the HTML report test (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

# The formatter and linter first (a second or two), then the suite.
lint: venv
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

test: venv browser lint
	UNPARROT_REQUIRE_BROWSER=1 $(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not slow"

bench: venv
	@missed=""; for f in benchmarks/[a-z]*.py; do echo "== $$f"; $(BIN)/python $$f || missed="$$missed $$f"; done; \
	if [ -n "$$missed" ]; then echo "targets missed or failed:$$missed"; exit 1; fi

clean:
	rm -rf $(VENV) demo-out .pytest_cache
