# make demo   set up .venv and generate 5 s of video with the embedded demo model (out.mp4)
# make test   set up .venv and run every test
# make peers  fetch StreamDiffusionV2's source from the package registry into .cache/peers (tests do it too)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo serve test test-fast bench peers lint clean

setup: $(STAMP)

# torch is pinned to 2.13.0 in requirements.lock: a CPU build where pip finds one (these machines),
# the regular CUDA build from PyPI elsewhere.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/streamer run --config configs/demo.yaml --prompt "a red circle and a blue square on black" \
		--seconds 5 --out out.mp4

serve: setup
	$(BIN)/streamer serve --config configs/demo.yaml --host 127.0.0.1 --port 8080

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

peers: setup
	$(BIN)/python -m bench.peers.sdv2.source

bench: setup
	$(BIN)/python -m bench.engine --config configs/tiny.yaml --json bench/results/engine-tiny-cpu.json

lint: setup
	$(BIN)/ruff check pipeline streamer bench tests
	$(BIN)/ruff format --check pipeline streamer bench tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) out.mp4 .pytest_cache .mypy_cache .ruff_cache
