# make demo | make test | make bench — each creates .venv and installs what it needs.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: demo test test-all bench venv ref-env clean

$(VENV_STAMP): setup.py
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(VENV_STAMP)

venv: $(VENV_STAMP)

# pytorch-fid's parity tests run it in an isolated env (tests/reference_env.py: torchvision
# cannot load beside .venv's CPU torch). Built once (~5 GB, minutes) and reused; when it cannot
# be built the parity tests skip and name the reason, the rest of the suite still runs.
REF_STAMP := .venv-ref/.installed
$(REF_STAMP): tests/reference_env.py
	-python3 tests/reference_env.py

ref-env: $(REF_STAMP)

# Tests run on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS), two pytest workers;
# `test` leaves out the tests marked slow (whole multi-run trainings), `test-all` runs them.
test: $(VENV_STAMP) ref-env
	$(PY) -m pytest -q -n 2 -m "not slow" tests

test-all: $(VENV_STAMP) ref-env
	$(PY) -m pytest -q -n 2 tests

demo: $(VENV_STAMP)
	$(PY) -m dalle_jax.tools.demo --out demo

bench: $(VENV_STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf .venv .venv-ref demo
