# make demo | make test | make bench — each creates .venv and installs what it needs.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: demo test bench venv clean

$(VENV_STAMP): setup.py
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

# Tests run on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS).
test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

demo: $(VENV_STAMP)
	$(PY) -m dalle_jax.tools.demo --out demo

bench: $(VENV_STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf .venv demo
