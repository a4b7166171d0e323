# Two commands do all the set-up: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	# --no-deps: the pins above already satisfy fxrec; never let pip resolve torch anew.
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/dlrm_train.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
