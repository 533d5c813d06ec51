# The two set-up commands of the README: `make run` and `make test`. Both work on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test lint system-deps services viewer

# Hilum alone (`make run`); the test tools come on top for `make test` and `make lint`.
$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build on these machines; a looser requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[ai]"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-run
	$(PY) -m pip install --quiet -e ".[ai,test]"
	touch $@

# The OHIF viewer served at /viewer: the pinned @ohif/app, fetched with npm, its integrity
# checked, unpacked without what it never requests (web/ohif.py). Once; later runs skip it.
viewer: $(VENV)/.installed-run
	@command -v npm >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }
	$(VENV)/bin/hilum viewer install

# Runs Hilum on its embedded default: SQLite + files under ./hilum-data, no other service.
run: $(VENV)/.installed-run viewer
	$(VENV)/bin/hilum serve

# docker-compose validates docker-compose.yml (`config`; no Docker engine is needed for that).
# DCMTK (storescu, echoscu) is the real DICOM peer of the tests.
# dicom3tools' dciodvfy checks the AI worker's SEG and SR (tests/inference/test_writers.py).
# Debian's chromium is the browser of tests/web (Playwright drives it; it never downloads one);
# npm fetches the pinned OHIF viewer (`hilum viewer install`).
# strace counts the blob store's fsync calls (tests/storage/test_blobs.py).
system-deps:
	@command -v /usr/bin/docker-compose >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; }
	@command -v /usr/bin/storescu >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk; }
	@command -v /usr/bin/dciodvfy >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools; }
	@command -v /usr/bin/chromium >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@command -v npm >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm; }
	@command -v /usr/bin/strace >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace; }

# The test suite talks to a real PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start && \
		sleep 2 && pg_isready -h 127.0.0.1 -p 5432; }

# tests/web/test_viewer.py opens OHIF from .test-services/ohif (HILUM_TEST_OHIF_DIR).
# Three pytest-xdist workers on these 2-core machines: most tests wait on servers, subprocesses
# and the browser, so a third worker fills the cores' idle time (the suite: ~26 min on one
# worker, ~12 on three). --dist loadfile keeps each module's shared fixtures on one worker; the
# slowest tests are listed at the end.
TEST_WORKERS ?= 3
test: $(VENV)/.installed system-deps services
	$(VENV)/bin/hilum viewer install --dir .test-services/ohif
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20

# ruff, then mypy on the product packages ([tool.mypy] in pyproject.toml lists them).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
