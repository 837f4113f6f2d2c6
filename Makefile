# The two quick-start commands. Each sets up .venv first (scripts/setup.sh; cheap when done).
PROMPT ?= The three most useful things to know about llamas are

.PHONY: generate test
generate:
	@scripts/setup.sh
	.venv/bin/plainllama generate "$(PROMPT)" -n 64

test:
	@scripts/setup.sh --test
	.venv/bin/python -m pytest
