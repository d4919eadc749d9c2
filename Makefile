# The two commands of the README. Each installs first (scripts/install.sh is idempotent).
.PHONY: install play test
install:
	bash scripts/install.sh
play: install
	.venv/bin/python -m app
test: install
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30
