.PHONY: install test test-gpu test-slow quality style docs docs-check

install:            ## editable install with the test and reward extras
	pip install -e ".[dev]"

test:               ## default tier: CPU, no network
	python -m pytest

test-gpu:           ## on a CUDA machine
	python -m pytest -m gpu

test-slow:          ## release checks (real weights, minutes)
	python -m pytest --run-slow

quality:            ## lint, and check that docs/cli.md matches the CLI
	ruff check .
	ruff format --check smpo_cli tests bench
	$(MAKE) docs-check

docs:               ## regenerate docs/cli.md from the Typer app
	python -m smpo_cli.cli.cli_docs > docs/cli.md.tmp && mv docs/cli.md.tmp docs/cli.md

docs-check:         ## fail when docs/cli.md is stale
	python -m pytest -q -p no:cacheprovider tests/unit/test_cli_docs.py

style:
	ruff check --fix .
	ruff format smpo_cli tests bench
