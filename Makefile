# Two set-up commands (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch comes from local disk on the project machines; never let an install
# resolve torch on its own (that pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv install demo test test-slow test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# lm-eval has no plug-in discovery: a .pth hook registers `lm_eval --model linmix`.
	$(PY) -c "from linmix._lm_eval_hook import write_pth; print('wrote', write_pth())"
	touch $@

install: $(VENV)/.installed

# The main job: `linmix tour` (MQAR quick study, RWKV-SAM on the bundled images, decode throughput).
demo: install
	$(VENV)/bin/linmix tour --out tour-out

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q -m "not gpu"

bench: install
	$(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
