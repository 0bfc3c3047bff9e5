# Two commands do all the set-up: `make demo` maps a real Sentinel-2 scene, `make test` runs the tests
# (`make quick` the fast tier, `make lint` the type and lint gate).
PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/data
RUN_DIR ?= runs/demo

$(VENV)/.installed: pyproject.toml .ci/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c .ci/constraints.txt -e '.[test,lint,clouds]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/geoseg run --scenes $(DATA)/sentinel2_strzegom/scenes/strzegom_20230530_33u.tif \
		--out $(RUN_DIR) --overwrite
	$(VENV)/bin/geoseg status $(RUN_DIR)

test: setup
	GEOSEG_DATA=$(DATA) $(VENV)/bin/pytest -q -p no:cacheprovider

# the quick tier for the edit-test loop (seconds, no clusters or end-to-end runs)
quick: setup
	GEOSEG_DATA=$(DATA) $(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow"

# Debian packages the tests need (CI runs as root): headless Chromium renders report.html, GDAL's tools check outputs
system-deps:
	@command -v chromium >/dev/null && command -v gdalinfo >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium gdal-bin; }

# the gate: strict types over geoseg/, lint over everything
lint: setup
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff check .

.PHONY: setup system-deps demo test quick lint
