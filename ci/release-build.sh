#!/usr/bin/env bash
# release-build.sh: every release binary of the workspace in one build. Building one package alone
# (`-p exchange-listener`, `cargo run -p harness`) unifies dependency features differently and so
# compiles tokio, hyper and the rest again; every CI step that needs a release binary calls this
# instead, and the second call costs a second.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --workspace --bins -q
