# Two commands a newcomer needs: `make demo` (set up, open the studio) and `make test`.
PYTHON ?= python3

.PHONY: setup browser test demo

# torch==2.13.0 is the CPU build on local disk; an already installed torch (a CUDA build on a
# GPU machine) is kept. The project's own install then finds torch satisfied and pulls nothing big.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

# The browser tests (tests/app/test_browser.py) drive Debian's Chromium through Playwright; Playwright's
# own browser download cannot run here, so Debian's package is installed (as root) when missing.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || (apt-get update && apt-get install -y --no-install-recommends chromium)

test: setup browser
	$(PYTHON) -m pytest -q

demo: setup
	$(PYTHON) -m studio serve
