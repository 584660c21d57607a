# The two commands of the README. Both create .venv when missing and install what they need into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU build first: a bare range could pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-quick test-matrix test-torch fuzz bench clean graphviz

$(PY):
	$(PYTHON) -m venv $(VENV)

# The library needs torch only; the command line (demo, inspect) is the [cli] extra, which both targets install.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[cli]'
	touch $@

# The test extra brings torchtitan and its requirements; naming $(TORCH) again keeps the pinned build in place.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[cli,test]' $(TORCH)
	touch $@

# Graphviz's `dot` draws captured programs (CapturedProgram.save_svg). Installed from Debian's packages when
# missing and we are root; otherwise save_svg's error says how to install it.
graphviz:
	@command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null) ; } || \
	  echo "note: graphviz not installed; save_svg will say how to install it"

demo: $(VENV)/.installed graphviz
	$(PY) -m localmap demo

# Two pytest workers (pytest-xdist), each taking whole files in their order: the suite is mostly one-core work
# (tracing, compiling), so two workers on 2 cores halve it. JOBS=1 runs it in one process, in one order.
JOBS ?= 2
test: $(VENV)/.installed-test graphviz
	$(PY) -m pytest -q $(if $(filter 1,$(JOBS)),,-n $(JOBS) --dist loadfile)

# A contributor's loop (at most 90 s on 2 cores): the unit tests, the quick slice of the path matrix and 20
# property examples; no real processes. Markers pick other slices: pytest -m "not slow", -m "compile", ...
test-quick: $(VENV)/.installed-test
	LOCALMAP_FUZZ_EXAMPLES=20 $(PY) -m pytest -q -p no:cacheprovider -m "not slow and (quick or not matrix)" \
	  tests/unit tests/matrix tests/check/test_properties.py

# Every catalogue program on every path of the matrix (make test runs a representative subset on the slower
# paths).
test-matrix: $(VENV)/.installed-test
	LOCALMAP_MATRIX=full $(PY) -m pytest -q tests/matrix

# The same suite on another PyTorch release, in its own venv (.venv-torch-X.Y.Z): `make test-torch` runs it on
# 2.14.1 (a CUDA build from this machine's disk, about 5.5 GB installed; it runs on the CPU), and
# `make test-torch TORCH=torch==2.15.0` on any other pinned release.
ifeq ($(origin TORCH),command line)
OTHER_TORCH := $(TORCH)
else
OTHER_TORCH := torch==2.14.1
endif
test-torch:
	$(MAKE) test VENV=.venv-$(subst ==,-,$(OTHER_TORCH)) TORCH=$(OTHER_TORCH)

# The property tests with 2,000 random cases (make test runs 200); prints how many ran. LOCALMAP_FUZZ_EXAMPLES
# sets the count, LOCALMAP_FUZZ_SEED=N draws another fixed sequence, LOCALMAP_FUZZ_SHRINK=1
# shrinks a failure to a small example.
FUZZ_EXAMPLES ?= 2000
fuzz: $(VENV)/.installed-test
	LOCALMAP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -s -p no:logging --timeout=3600 tests/check/test_properties.py

# The benchmarks need the library and pytest (they read the check's catalogue from tests/), not the test extra.
$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[cli,bench]' $(TORCH)
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/bench_eager.py
	$(PY) benchmarks/bench_compile.py
	$(PY) benchmarks/bench_check.py

clean:
	rm -rf $(VENV) .venv-torch-* build src/*.egg-info .pytest_cache
