#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo, idempotently: Python packages for the
# Jinja2 parity test and the benchmark peer. (Later issues add OpenBao, PostgreSQL and
# Chromium here.) Safe to run on a developer machine; CI runs it from .ci/run.
set -euo pipefail

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "Running pip as the 'root' user" || true
}

if ! python3 -c 'import jinja2, yaml' 2>/dev/null; then
  pip_install jinja2 pyyaml
fi
python3 -c 'import jinja2, yaml' || { echo "python3 with jinja2 and pyyaml is required" >&2; exit 1; }
