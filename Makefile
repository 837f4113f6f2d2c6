# The two quick-start commands. Each sets up .venv first (scripts/setup.sh; cheap when done).
# The default model is an instruct model, so the default prompt goes through its chat format.
PROMPT ?= Write a short poem about a llama in the Andes.

.PHONY: generate test lint
generate:
	@scripts/setup.sh
	.venv/bin/plainllama generate --chat "$(PROMPT)" -n 120

test:
	@scripts/setup.sh --test
	.venv/bin/python -m pytest

# Run by .ci/run before the tests: lint (ruff), formatting (ruff format) and types (mypy), settings in pyproject.toml.
lint:
	@scripts/setup.sh --test
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
