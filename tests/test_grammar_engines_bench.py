"""scripts/bench/grammar_engines.py runs end to end on the embedded tokenizer with the server's engine (llguidance):
every corpus schema is compiled or refused by name, every valid instance is followed to EOS, every invalid one is
refused before it, and the regexes compile and are followed (speed itself is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO

pytest.importorskip("llguidance")
pytestmark = pytest.mark.slow

FIXTURES = REPO / "tests" / "fixtures" / "structured"


def test_llguidance_on_the_tiny_tokenizer(tmp_path):
    out = tmp_path / "r.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench" / "grammar_engines.py"), "--engines", "llguidance",
         "--time-limit", "20", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={"TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin", "HOME": str(REPO)},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["engine"] == "llguidance" and cell["ended"] == "done" and cell["prep_s"] > 0
    schemas = {e["name"]: e["schema"] for e in json.loads((FIXTURES / "schemas.json").read_text())}
    s = cell["json_schema"]
    assert s["total"] == len(schemas) and s["not_reached"] == 0
    # The engine refuses only what it cannot enforce, by name (uniqueItems); everything else compiles and its
    # valid instance is followed token by token to EOS.
    assert s["refused"] == len(s["refused_names"]) >= 1
    assert all("uniqueItems" in json.dumps(schemas[n]) for n in s["refused_names"])
    assert s["followed"] == s["accepted"] == len(schemas) - s["refused"]
    assert s["masks"] > s["accepted"] and s["mask_us_median"] > 0
    rx = cell["regex"]
    assert rx["total"] == len(json.loads((FIXTURES / "regexes.json").read_text()))
    assert rx["followed"] == rx["accepted"] == rx["total"]
    bad = cell["invalid"]
    assert bad["accepted"] >= 1 and bad["not_followed_complement"] == []  # none let through
    assert "| tiny (embedded) | llguidance" in r.stdout
