# Set-up and checks.  `make run` installs and runs the main job with the shipped
# defaults; `make test` installs what the tests need and runs them (CI calls it).
#
# TORCH picks the torch build.  The default is the CPU wheel (quick to install,
# and on our machines it is a local file).  On a GPU machine install your CUDA
# torch into the venv first, or run `make install TORCH=torch`.

PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= ../shared/data
BIN := $(VENV)/bin

.PHONY: install run test lint bench clean proto docs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[engine,test]"
	touch $@

run: install
	$(BIN)/nuclick-bridge evaluate --images $(DATA)/monuseg/images --labels $(DATA)/monuseg/labels \
	    --split val --jitter 5 --seed 0

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint docs install-omero java-test deploy-deps test-no-torch
	$(BIN)/python -m pytest -q

# The documentation site (mkdocs.yml, docs/; the `docs` extra, part of the test extras) built into site/
# (git-ignored). --strict: a broken link, a missing page or a page left out of the nav fails the build,
# and `make test` runs it (never with --quiet: it hides the warnings that --strict counts).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python benchmarks/nuclei_per_second.py --data $(DATA)

# Regenerate bridge/service/gen from proto/ (grpcio-tools, installed with the test extras);
# a test checks that the committed files are what this gives.
proto: install
	$(BIN)/python -m bridge.service.protogen

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache

# The OMERO connector (nuclick-bridge omero) needs omero-py, which needs zeroc-ice 3.6.5:
# PyPI has only its source, which needs two fixes to build on Python 3.11.
# scripts/build_zeroc_ice.py builds the wheel once, compiling on every CPU, caches it in the user's
# cache folder (${XDG_CACHE_HOME:-~/.cache}/nuclick-bridge/wheels/<python>-<platform>, shared by
# every clone on the machine; WHEELS=DIR puts it elsewhere), then installs ".[omero]" taking
# zeroc-ice from there (seconds on later runs and in later clones).
WHEELS ?=
ICE_WHEEL_DIR = $(if $(WHEELS),--wheel-dir $(WHEELS))
.PHONY: install-omero

install-omero: $(VENV)/.installed-omero

$(VENV)/.installed-omero: $(VENV)/.installed scripts/build_zeroc_ice.py
	nice -n 10 $(BIN)/python scripts/build_zeroc_ice.py $(ICE_WHEEL_DIR) --install
	touch $@

# The QuPath extension's plain-Java core (qupath_extension/): compiled with the machine's javac
# (--release 17) against Debian's gson and JUnit 5 jars, then its unit tests; no Gradle, QuPath or
# Maven needed.  Its end-to-end test against a real server runs in pytest (tests/test_qupath_extension.py).
.PHONY: java-test java-deps
java-deps:
	bash scripts/install_java_deps.sh

java-test: java-deps
	bash qupath_extension/javatest.sh test --details=summary --disable-ansi-colors

# The QuPath 0.6 check (not part of `make test`: needs network, Gradle 8.x and a JDK 21): the whole
# extension compiled against QuPath 0.6 with -Xlint:all -Werror, then its non-GUI path run on a real
# image against a real `nuclick-bridge serve` on 127.0.0.1 (scripts/qupath_check.sh says more).
QUPATH_CHECK_IMAGE ?= $(DATA)/monuseg/images/TCGA-18-5592-01Z-00-DX1.png
.PHONY: qupath-check
qupath-check: install
	bash scripts/qupath_check.sh $(QUPATH_CHECK_IMAGE)

# Scale-out checks (tests/test_nginx_proxy.py, tests/test_deploy.py): Debian's nginx for the
# reverse-proxy test (installed quietly when /usr/sbin/nginx is missing); kubernetes-validate, which
# ships the Kubernetes JSON schemas for checking deploy/kubernetes/ offline, is in the test extras.
.PHONY: deploy-deps
deploy-deps:
	bash scripts/install_nginx.sh

# The install without torch (no `engine` extra): what a machine that only talks to a NuClick server
# needs, such as the OMERO server for the OMERO.web script.  `install-client` makes it in
# $(CLIENT_VENV) with omero-py (zeroc-ice from the wheel cache above); `test-no-torch` runs
# `segment --server` and the OMERO script there against a server in the main venv.  The client
# venv also gets pytest, because the script's in-memory OMERO (tests/support) imports test helpers.
CLIENT_VENV ?= .venv-client
.PHONY: install-client test-no-torch

install-client: $(CLIENT_VENV)/.installed

$(CLIENT_VENV)/.installed: pyproject.toml scripts/build_zeroc_ice.py
	test -x $(CLIENT_VENV)/bin/python || $(PY) -m venv $(CLIENT_VENV)
	nice -n 10 $(CLIENT_VENV)/bin/python scripts/build_zeroc_ice.py $(ICE_WHEEL_DIR) --install
	! $(CLIENT_VENV)/bin/python -c "import torch" 2>/dev/null
	touch $@

test-no-torch: install $(CLIENT_VENV)/.installed
	$(CLIENT_VENV)/bin/pip install -q "pytest>=7.4"
	NB_CLIENT_PYTHON=$(CLIENT_VENV)/bin/python $(BIN)/python -m pytest -q tests/test_no_torch.py
