#!/usr/bin/env bash
# The whole test suite, as a newcomer and CI run it: installs what the tests need when it is
# missing, then checks formatting and lints and runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=""
# need COMMAND DEBIAN-PACKAGE: install the package when the command is missing, or fail saying how.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "ci/test.sh: installing $2 (for $1)"
        if [ -z "$apt_updated" ]; then apt-get update -qq; apt_updated=1; fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    fi
    command -v "$1" >/dev/null 2>&1 || {
        echo "ci/test.sh: '$1' is missing; install the Debian package '$2' (apt-get install $2)" >&2
        exit 1
    }
}

command -v cargo >/dev/null 2>&1 || {
    echo "ci/test.sh: cargo is missing; install a Rust toolchain (https://rustup.rs)" >&2
    exit 1
}
need kill procps
need python3 python3
need redis-server redis-server
need dovecot dovecot-imapd
need openssl openssl
need curl curl

# exchangelib, the third-party EWS client that mock-ews must satisfy, in a private venv.
venv=target/exchangelib-venv
if ! "$venv/bin/python" -c 'import exchangelib' >/dev/null 2>&1; then
    echo "ci/test.sh: installing exchangelib 5.6.0 into $venv"
    python3 -m venv "$venv" 2>/dev/null || {
        need apt-get apt
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check exchangelib==5.6.0
fi
export EXCHANGELIB_PYTHON="$PWD/$venv/bin/python"
for component in rustfmt clippy; do
    cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1 || rustup component add "$component"
done

echo "== format"
cargo fmt --all --check
echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== test"
cargo test --workspace --locked
echo "== benchmarks compile"
cargo bench --workspace --locked --no-run -q
echo "== chart"
# The chart's offline checks: Helm's library and the Kubernetes schemas, from PyPI.
chart_venv=target/chart-venv
if ! "$chart_venv/bin/python" -c 'import helm_python, kubernetes_validate, yaml' >/dev/null 2>&1; then
    echo "ci/test.sh: installing helm-python-sdk 0.2.2 and kubernetes-validate 1.37.0 into $chart_venv"
    python3 -m venv "$chart_venv"
    "$chart_venv/bin/pip" install --quiet --disable-pip-version-check \
        helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 pyyaml
fi
"$chart_venv/bin/python" ci/chart-check.py | tail -n 3
echo "== release build (once, for the image, the chart's pods and the harness)"
ci/release-build.sh
echo "== image, and the chart's pods run on Docker"
ci/image-check.sh
"$chart_venv/bin/python" ci/chart-run.py
echo "== harness demo, timed"
target/release/harness demo --replicas 2 --mailboxes 3 --mail-every-secs 1 --for-secs 6 | tail -n 3
echo "== scenario suite (harness run scenarios/)"
# Redis through testcontainers on the Docker engine; any broken rule fails the run.
target/release/harness run --progress-secs 15
