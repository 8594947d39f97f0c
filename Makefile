# The commands README.md names. `make` builds the extension under its SQLite name.
CARGO ?= cargo
PYTHON_FOR_VENV ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
N ?= 100000
EXT := dist/archaeclip.so

.PHONY: all build test test-rust test-python demo train-demo bench venv clean

all: build

build: $(EXT)

$(EXT): $(shell find src -name '*.rs') Cargo.toml Cargo.lock build.rs
	$(CARGO) build --release --locked
	mkdir -p dist
	cp target/release/libarchaeclip.so $(EXT)

# A venv from Debian's Python, whose sqlite3 module can load extensions (pyenv's cannot).
$(VENV)/.installed: tests/requirements.txt
	$(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

venv: $(VENV)/.installed

test: test-rust test-python

# In-process tests on a bundled SQLite (the `static` feature; never combined with `loadable`),
# then the library's own unit tests as built for loading (the entry point's version check).
# Release profile: the CLIP tests run models, and the dependencies are shared with `build`.
test-rust:
	$(CARGO) test --release --locked --no-default-features --features static
	$(CARGO) test --release --locked --lib

# The built .so, loaded from the sqlite3 shell and Python, as users load it.
test-python: build venv
	$(PY) -m pytest -q tests/python

demo: build venv
	$(PY) examples/demo_collection.py dist/demo.db
	sqlite3 dist/demo.db < sql/demo.sql
	@echo
	@echo "The demo database is dist/demo.db: open it with"
	@echo "  sqlite3 dist/demo.db -cmd '.load ./dist/archaeclip'"

# Retrains the bundled model models/archaeclip-demo from random weights with clip_train
# (sql/train_demo.sql), then records its held-out evaluation next to it.
train-demo: build venv
	$(PY) examples/demo_collection.py dist/demo.db
	sqlite3 dist/demo.db < sql/train_demo.sql | tee dist/train_demo.log
	sqlite3 dist/demo.db < sql/evaluate_demo.sql | tee models/archaeclip-demo/evaluation.txt

bench: build venv
	$(PY) benches/search_bench.py --n $(N)

clean:
	rm -rf dist target/release/libarchaeclip.so
