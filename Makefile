# The two commands of the README. Each installs first (scripts/install.sh is idempotent).
.PHONY: install play test
install:
	bash scripts/install.sh
play: install
	.venv/bin/python -m app
# Two workers, each taking whole test modules (tests/conftest.py schedules them), so module fixtures load once: much of
# the suite waits on process start-up, imports and vLLM's one-core engine, and a second worker fills the idle core.
test: install
	.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --durations=30
