#!/usr/bin/env bash
# Headless Chromium (Debian's packages) and Selenium in the project's venv, for the playground's browser test
# (tests/test_playground.py). Idempotent: does nothing when both are already there. Needs root for apt-get.
#
#   bash scripts/setup-browser.sh          # VENV=... to use another venv than .venv
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$here/.venv}"
selenium_pin="selenium>=4.20,<5"

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  sudo=""
  if [[ "$(id -u)" != 0 ]]; then
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -q
  $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
fi

if [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -c "import selenium" 2>/dev/null; then
  "$venv/bin/python" -m pip install -q "$selenium_pin"
fi

chromium --version
chromedriver --version
