# The two commands a newcomer needs; each sets up .venv itself (see scripts/setup_env.sh).
.PHONY: setup test test-all demo demo-local bench

setup:
	bash scripts/setup_env.sh

test: setup
	.venv/bin/python -m pytest -q

# everything, the long end-to-end runs (marked slow) included
test-all: setup
	.venv/bin/python -m pytest -q -m ""

demo: setup
	.venv/bin/python -m distil_ray.main +experiment=tiny

bench: setup
	.venv/bin/python benchmarks/bench_logprobs.py

demo-local: setup
	.venv/bin/python -m distil_ray.demo
