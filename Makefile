# The commands README.md names. `make` builds the extension under its SQLite name.
CARGO ?= cargo
PYTHON_FOR_VENV ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
N ?= 100000
EXT := dist/archaeclip.so

.PHONY: all build test test-rust test-python test-browser demo train-demo site bench bench-index fuzz venv clean

all: build

build: $(EXT)

# The new library is renamed over the old one: a process that has the old one loaded keeps it
# (copying over it in place would change its mapped code under that process: SIGBUS).
$(EXT): $(shell find src -name '*.rs') Cargo.toml Cargo.lock build.rs
	$(CARGO) build --release --locked
	mkdir -p dist
	cp target/release/libarchaeclip.so $(EXT).tmp
	mv -f $(EXT).tmp $(EXT)

# A venv from Debian's Python, whose sqlite3 module can load extensions (pyenv's cannot).
$(VENV)/.installed: tests/requirements.txt site/requirements.txt
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

# The website (site/, docs/site.md): Datasette with the extension and site/ loaded, serving the
# demo collection (made by `make demo` if missing) on http://127.0.0.1:$(SITE_PORT)/. Visitors'
# SQL runs on read-only connections under the extension's untrusted policy; saved searches go to
# dist/site.db, written by the plugin only.
SITE_PORT ?= 8001
SITE_HOST ?= 127.0.0.1
site: build venv
	test -f dist/demo.db || $(MAKE) demo
	$(PY) site/build.py dist/demo.db dist/site.db models/archaeclip-demo $(wildcard dist/archaeclip-demo-catalogue)
	ARCHAECLIP_POLICY=untrusted ARCHAECLIP_MODEL=$(CURDIR)/models/archaeclip-demo \
	  $(VENV)/bin/datasette serve dist/demo.db dist/site.db --host $(SITE_HOST) --port $(SITE_PORT) \
	  --load-extension $(EXT) --metadata site/metadata.yaml --template-dir site/templates \
	  --plugins-dir site/plugins --static static:site/static

# The site in headless Chromium (Debian's chromium and chromium-driver; .ci/run installs them).
test-browser: build venv
	$(PY) -m pytest -q tests/python/test_site.py -k browser

bench: build venv
	$(PY) benches/search_bench.py --n $(N)

# The persistent index (clip_index) against sqlite-vec's vec0: exact, int8 and binary modes.
bench-index: build venv
	$(PY) benches/index_bench.py --n $(N)

# Fuzzing (nightly Rust and cargo-fuzz; not part of `make test`, which replays the corpus in
# tests/fuzz_corpus.rs). FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 60
fuzz:
	cd fuzz && for t in vector_blob vector_json config tokenizer model_dir image; do \
	  cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -rss_limit_mb=2048 -timeout=10 || exit 1; done

clean:
	rm -rf dist target/release/libarchaeclip.so
