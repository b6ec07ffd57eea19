# Stellwerk: `make demo` runs the main job, `make test` the whole suite (lint and types included).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo simulate crowd-example phone-example test lint types unit alerts services browser bench clean

# Debian ships venv separately (python3-venv); install it when missing and we are root.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
		&& rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The live demo: daemon on local Redis + Mosquitto, one minute of loadgen, the report.
demo: $(STAMP)
	./scripts/demo.sh

# The crowd service live: a champion answers, an unanswered topic reaches the desk, the report.
crowd-example: $(STAMP)
	./scripts/crowd-example.sh

# One morning on the phones: the daemon against a simulated Asterisk (the ARI protocol peer),
# each call's timeline printed.
phone-example: $(STAMP)
	./scripts/services.sh >/dev/null
	$(BIN)/python scripts/phone_example.py

# The same routing on virtual time: a simulated contact-centre day, per-queue report.
simulate: $(STAMP)
	$(BIN)/stellwerk simulate --routing config/routing.yaml --hours 8 --seed 7

services:
	./scripts/services.sh

# Debian's chromium for the browser tests of /desk and /wall (installed when missing, as root).
browser:
	./scripts/browser.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# The alert rules' unit tests (promtool, unpacked from Debian's prometheus package if missing).
alerts: $(STAMP)
	./scripts/promtool.sh check rules config/prometheus-alerts.yaml
	./scripts/promtool.sh test rules config/prometheus-alerts.test.yaml

test: $(STAMP) services browser lint types alerts unit

bench: $(STAMP)
	$(BIN)/python benchmarks/hot_path.py
	$(BIN)/python benchmarks/decide.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/state.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis artifacts
