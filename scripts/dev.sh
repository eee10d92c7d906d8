#!/usr/bin/env bash
# One entry point for a fresh machine (CPU, no network but the package index):
#
#   scripts/dev.sh serve  [serve flags]   set up .venv (runtime packages only), then serve the embedded tiny BLOOM on
#                                         127.0.0.1:8080 ($BLOOM_PORT, or --port, for another port)
#   scripts/dev.sh client "a prompt" [...]  stream a completion from that server (`bloom-server client`; it finds the
#                                         port in $BLOOM_PORT, or give --url)
#   scripts/dev.sh test   [pytest args]   set up .venv with the test extras, the offline deploy checkers and headless
#                                         Chromium, then the checks (`lint`), then the tests (the default tier unless
#                                         -m says otherwise: see pyproject.toml's markers)
#   scripts/dev.sh lint                   ruff (format and lint) and mypy, as configured in pyproject.toml
#   scripts/dev.sh setup  [test]          only set up .venv (runtime packages; with `test`, the test extras too)
#
# torch is pinned to 2.13.0 first: on these machines that resolves to a local CPU wheel, where an unpinned torch would
# pull several GB of CUDA packages. The rest comes from pyproject.toml (transformers pinned to 4.43.4: see README).
# Serving needs only the runtime packages; the test extras (client libraries, Triton, Selenium, ...) are several
# times larger, so only `test` installs them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${VENV:-$here/.venv}"
python="${PYTHON:-python3}"

say() { echo "dev.sh: $*" >&2; }

# setup runtime|test. The stamp holds pyproject.toml's hash and the level installed; `test` includes `runtime`.
setup() {
  local level="${1:-runtime}"
  if [[ ! -x "$venv/bin/python" ]]; then
    say "creating the virtual environment $venv"
    "$python" -m venv "$venv"
  fi
  local stamp="$venv/.bloom-setup"
  local hash have=""
  hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  [[ -f "$stamp" ]] && have="$(cat "$stamp")"
  if { [[ "$have" == "$hash test" ]] || [[ "$have" == "$hash $level" ]]; } \
      && "$venv/bin/python" -c "import bloom_server, torch" 2>/dev/null; then
    return 0
  fi
  local t0=$SECONDS
  say "installing into $venv (a first set-up downloads a few hundred MB; later runs skip this)"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
  say "  torch 2.13.0 (CPU)"
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
  if [[ "$level" == test ]]; then
    say "  bloom-server with its runtime packages and the test extras"
    "$venv/bin/python" -m pip install -q -e ".[test]"
  else
    say "  bloom-server with its runtime packages (transformers, FastAPI, uvicorn, ...)"
    "$venv/bin/python" -m pip install -q -e .
  fi
  echo "$hash $level" >"$stamp"
  say "set up in $((SECONDS - t0)) s; $(du -sh "$venv" | cut -f1) in $venv"
}

# The checks CI runs before the tests; each one's configuration is in pyproject.toml.
lint() {
  say "ruff format --check, ruff check, mypy"
  "$venv/bin/ruff" format --check --quiet .
  "$venv/bin/ruff" check --quiet .
  "$venv/bin/mypy"
}

cmd="${1:-serve}"
shift || true
case "$cmd" in
  setup)
    setup "${1:-runtime}"
    ;;
  serve)
    setup runtime
    export TOKENIZERS_PARALLELISM=false
    say "serving on http://${BLOOM_HOST:-127.0.0.1}:${BLOOM_PORT:-8080} (the first start builds the embedded model: a few seconds)"
    exec "$venv/bin/bloom-server" serve --host "${BLOOM_HOST:-127.0.0.1}" --port "${BLOOM_PORT:-8080}" "$@"
    ;;
  client)
    setup runtime
    exec "$venv/bin/bloom-server" client "$@"
    ;;
  lint)
    setup test
    lint
    ;;
  test)
    setup test
    lint
    bash scripts/setup-tools.sh
    # Headless Chromium + Selenium for the playground test; apt needs the package mirror: if it is unreachable the
    # browser test says why it skipped instead of failing the whole run.
    VENV="$venv" bash scripts/setup-browser.sh || echo "dev.sh: browser setup failed; tests/test_playground.py will skip" >&2
    export TOKENIZERS_PARALLELISM=false
    exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh serve|client|test|lint|setup [args]" >&2
    exit 2
    ;;
esac
