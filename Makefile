# `make demo` and `make test` set everything up first: nothing to do by hand.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
BUN := node_modules/.bin/bun
NETSHIM := workers/runtime/netshim.so
CGJOIN := workers/runtime/cgjoin
CORPUS := tests/corpus

.PHONY: setup sandbox sandbox-access k8s-validate docs demo test test-fast lint typecheck format bench soak clean

setup: $(VENV)/.installed $(BUN) $(NETSHIM) $(CGJOIN) $(CORPUS)/node_modules/.installed sandbox sandbox-access

# The route for raw TCP sockets (Bun.connect, node:net, node:http) of tools granted
# --allow-net, through the egress proxy (docs/security/network.md); without a C compiler they
# have no route and fetch alone works.
$(NETSHIM): workers/runtime/netshim.c
	@if command -v cc >/dev/null 2>&1; then cc -O2 -Wall -Wextra -shared -fPIC -o $@ $< -ldl -lpthread; \
	  else echo "no C compiler (cc): $@ not built; raw TCP sockets of tools have no route"; fi

# Joins a spawned process to its cgroups, sets its open-file limit and drops it to the
# tools' uid before bwrap (workers/runtime/cgjoin.c): one small exec instead of a shell
# and setpriv (~2 ms of CPU less per spawned process). Static where the toolchain can;
# without a C compiler the launcher uses the shell.
$(CGJOIN): workers/runtime/cgjoin.c
	@if command -v cc >/dev/null 2>&1; then cc -O2 -Wall -Wextra -static -o $@ $< 2>/dev/null \
	  || cc -O2 -Wall -Wextra -o $@ $<; \
	  else echo "no C compiler (cc): $@ not built; a shell and setpriv join cgroups"; fi

# Tools run in a bubblewrap sandbox (runtime.sandbox); install it where we can (root on
# Debian/Ubuntu). Elsewhere `auto` runs unsandboxed with a warning and the sandbox tests fail.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
	      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null)) ; } \
	  || echo "bubblewrap not installed: install it (package bubblewrap) to sandbox tools"

# Tools run as uid 65534 in the sandbox (docs/security/sandbox.md), and the test and demo tools
# and Bun live in this checkout: as root, make each directory above it traversable for
# that uid (o+x: enter, not list) where it is not, and say which.
sandbox-access:
	@if [ "$$(id -u)" = 0 ]; then d="$(CURDIR)"; while [ "$$d" != "/" ]; do \
	  case "$$(stat -c %A "$$d")" in ?????????[xt]) ;; *) chmod o+x "$$d" && \
	    echo "sandbox: made $$d traversable for the tools' uid 65534 (chmod o+x)";; esac; \
	  d="$$(dirname "$$d")"; done; fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,otel]'
	touch $@

# Bun comes from the npm package `bun`, pinned in package.json / package-lock.json,
# installed inside the repo; the runner finds it there without touching PATH.
$(BUN): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	$(BUN) --version >/dev/null 2>&1 || node node_modules/bun/install.js
	$(BUN) --version
	touch -h $@

# The corpus tier's npm packages (tests/test_corpus.py), pinned in its bun.lock, installed
# with the pinned Bun from the npm registry; again only when the lockfile or Bun changes.
$(CORPUS)/node_modules/.installed: $(CORPUS)/package.json $(CORPUS)/bun.lock $(BUN)
	cd $(CORPUS) && ../../$(BUN) install --frozen-lockfile --no-progress >/dev/null
	touch $@

demo: setup
	$(BIN)/toolq demo

# Everything: the fast tier, then behaviour tests with real Redis, Celery workers and Bun.
# The fast tier first (seconds; k8s-validate has run its manifest tests), then the
# end-to-end tier in 4 test processes: its tests mostly wait on workers, Bun or a timeout,
# so 4 fill 2 cores. They are handed out test by test, except that a module defining a
# module-scoped fixture stays whole on one process (tests/conftest.py); each test process
# has its own Redis database and basetemp.
test: setup lint k8s-validate docs
	$(BIN)/python -m pytest tests/fast --ignore=tests/fast/test_kubernetes_manifests.py
	$(BIN)/python -m pytest tests --ignore=tests/fast -n 4 --dist loadgroup

# The Kubernetes manifests (deploy/kubernetes), offline: every overlay rendered by
# kustomize (kubectl's, v5: this project's machines ship kubectl; Debian's
# kubernetes-client is too old for components), checked against the schemas of a current
# Kubernetes release (kubernetes-validate from PyPI, schemas inside the package) and the
# KEDA / Prometheus Operator CRDs (npm), every command, flag, port, path, setting and
# metric name against toolq (tests/fast/test_kubernetes_manifests.py).
K8S_CRDS := deploy/kubernetes/validate/node_modules/.installed
k8s-validate: $(VENV)/.k8s-validate $(K8S_CRDS)
	@command -v kubectl >/dev/null 2>&1 || { echo "k8s-validate: needs kubectl >= 1.27 \
	  (kustomize v5) on PATH"; exit 2; }
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/fast/test_kubernetes_manifests.py

$(VENV)/.k8s-validate: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
	touch $@

$(K8S_CRDS): deploy/kubernetes/validate/package.json deploy/kubernetes/validate/package-lock.json
	npm ci --prefix deploy/kubernetes/validate --no-audit --no-fund --loglevel=error
	touch $@

# The documentation site (mkdocs.yml, docs/) into site/ (git-ignored). --strict: a broken
# link or anchor, or a page missing from nav, fails it. docs/hooks.py generates the
# settings and CLI references from the code at build time, so they cannot drift.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The policy/unit tier: no Redis, no Bun, no bubblewrap; a few seconds.
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest tests/fast

bench: setup
	$(BIN)/toolq bench --modes spawn,warm,spawn-cold --rounds 5
	$(BIN)/python bench/tracing_cost.py --rounds 3 --report bench/RESULTS.md

# Chaos soak (not part of `make test`): calls through worker SIGKILLs and Redis restarts.
soak: setup
	$(BIN)/python bench/soak.py --calls 600 --duration 120 --long-outage

# Then which part of toolq may import which (pyproject [tool.importlinter]: ground <- rooms
# <- roof), over typecheck's link tree: grimp cannot follow the package-dir mapping either.
lint: setup typecheck
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd .typecheck && ../$(BIN)/lint-imports ../pyproject.toml

# The source folders install under `toolq.` (see pyproject.toml); mypy cannot follow
# that mapping, so it checks a tree of links laid out as the installed package.
typecheck: setup
	rm -rf .typecheck && mkdir -p .typecheck/toolq
	for f in toolq/*.py toolq/py.typed; do ln -s ../../$$f .typecheck/toolq/; done
	for d in config workers producers cli; do ln -s ../../$$d .typecheck/toolq/$$d; done
	cd .typecheck && ../$(BIN)/mypy --config-file ../pyproject.toml -p toolq

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) node_modules $(NETSHIM) .typecheck .pytest_cache .mypy_cache .ruff_cache *.egg-info site
