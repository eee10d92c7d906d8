#!/usr/bin/env bash
# One entry point for a fresh machine (CPU, no network but the package index):
#
#   scripts/dev.sh serve [serve flags]   set up .venv, then serve the embedded tiny BLOOM on 127.0.0.1:8080
#   scripts/dev.sh test  [pytest args]   set up .venv, the offline deploy checkers and headless Chromium, then run the
#                                        whole test suite
#   scripts/dev.sh setup                 only set up .venv
#
# torch is pinned to 2.13.0 first: on these machines that resolves to a local CPU wheel, where an unpinned torch would
# pull several GB of CUDA packages. The rest comes from pyproject.toml (transformers pinned to 4.43.4: see README).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3}"

setup() {
  if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
  fi
  local stamp="$venv/.bloom-setup"
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import bloom_server, torch" 2>/dev/null; then
    return 0
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  "$venv/bin/python" -m pip install -q -e ".[test]"
  echo "$want" >"$stamp"
}

cmd="${1:-serve}"
shift || true
case "$cmd" in
  setup)
    setup
    ;;
  serve)
    setup
    export TOKENIZERS_PARALLELISM=false
    exec "$venv/bin/bloom-server" serve --host "${BLOOM_HOST:-127.0.0.1}" --port "${BLOOM_PORT:-8080}" "$@"
    ;;
  test)
    setup
    bash scripts/setup-tools.sh
    # Headless Chromium + Selenium for the playground test; apt needs the package mirror: if it is unreachable the
    # browser test says why it skipped instead of failing the whole run.
    VENV="$venv" bash scripts/setup-browser.sh || echo "dev.sh: browser setup failed; tests/test_playground.py will skip" >&2
    export TOKENIZERS_PARALLELISM=false
    exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh serve|test|setup [args]" >&2
    exit 2
    ;;
esac
