# The two commands of a fresh machine: `make demo` and `make test`. Both are safe to rerun.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv system-deps board-deps clean install uninstall

# Debian's PortAudio for sounddevice, and the ALSA file plugin the device tests use; Chromium
# and its WebDriver for the web page's browser test.
system-deps:
	@if ! ldconfig -p | grep -q libportaudio.so.2 || [ ! -e /usr/share/alsa/alsa.conf ] || \
	    ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq libportaudio2 libasound2-plugins alsa-utils chromium chromium-driver >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq libportaudio2 libasound2-plugins alsa-utils chromium chromium-driver)); \
	  else echo "note: install libportaudio2 (sudo apt-get install libportaudio2) for real audio devices, chromium chromium-driver for the page's browser test"; fi; \
	fi

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# llama-cpp-python compiles once (about 5 minutes); pip's wheel cache keeps the build.
	$(BIN)/pip install -q -e '.[portable,demo-models,test,bench]'
	@touch $(STAMP)

venv: system-deps $(STAMP)

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python -m assistant demo

# On a board: `sudo make install`: the venv with the board's extras and those the config's
# backend needs (llm.backend: llamacpp adds `portable`; the installed config when there is
# one, else ./config.yaml), then the service (user, unit, config, state dirs, the command in
# /usr/local/bin, the config's speech models; see README.md). An upgrade is
# `git pull && sudo make install`: config, models and transcript are kept, a running service
# restarts once.
EXTRAS ?= board
# What the service needs at run time (PortAudio); the test tools (a browser) are not.
board-deps:
	@if ! ldconfig -p | grep -q libportaudio.so.2; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq libportaudio2 >/dev/null 2>&1 || \
	    (apt-get update -qq && apt-get install -y -qq libportaudio2); \
	  else echo "note: install libportaudio2 (sudo apt-get install libportaudio2) for real audio devices"; fi; \
	fi

install: board-deps
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	@more=$$($(BIN)/python -m assistant.install_models); if [ -n "$$more" ]; then \
	  echo "the config's backend needs the extras: $$more"; \
	  $(BIN)/pip install -q -e ".[$(EXTRAS),$$more]"; fi
	$(BIN)/rkvlm-assistant install

uninstall:
	$(BIN)/rkvlm-assistant uninstall

clean:
	rm -rf $(VENV) .pytest_cache
