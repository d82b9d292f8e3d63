# Two commands for a newcomer:  `make demo` (the whole pipeline locally)  and  `make test`.
# Both create ./.venv and install the project into it on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch first: a bare "torch" would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,server]'
	touch $(STAMP)

.PHONY: install demo test postgres
install: $(STAMP)

# tests/test_services_integration.py runs MLflow on PostgreSQL and skips only where it is missing: as root
# with apt-get (CI, a fresh container) install Debian's package; elsewhere say why that module will skip.
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	else echo "PostgreSQL is not installed (and cannot be installed here without root and apt-get):"\
	  "tests/test_services_integration.py will skip"; fi

demo: $(STAMP)
	$(BIN)/clipflow run

test: $(STAMP) postgres
	$(BIN)/python -m pytest
