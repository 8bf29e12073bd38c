.PHONY: install test test-gpu test-slow quality style

install:            ## editable install with the test and reward extras
	pip install -e ".[dev]"

test:               ## default tier: CPU, no network
	python -m pytest

test-gpu:           ## on a CUDA machine
	python -m pytest -m gpu

test-slow:          ## release checks (real weights, minutes)
	python -m pytest --run-slow

quality:            ## lint
	ruff check .
	ruff format --check smpo_cli tests bench

style:
	ruff check --fix .
	ruff format smpo_cli tests bench
