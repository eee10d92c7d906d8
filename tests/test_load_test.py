"""scripts/bench/load_test.py against a real tiny-model server on 127.0.0.1: counts, exact lengths, timings present, errors
reported (not crashed on), bounds honoured. No speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from helpers import REPO, ServerProcess, free_port

SCRIPT = REPO / "scripts" / "bench" / "load_test.py"
sys.path.insert(0, str(REPO / "scripts" / "bench"))
import load_test


def run_script(*args: str, timeout: float = 180) -> tuple[int, str, float]:
    t = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t


def test_streamed_closed_loop_exact_lengths(server, tmp_path):
    out = tmp_path / "run.json"
    code, text, _ = run_script(
        "--url",
        server.url,
        "--stream",
        "--concurrency",
        "3",
        "--prompt-tokens",
        "4-24",
        "--new-tokens",
        "4-24",
        "--requests",
        "12",
        "--duration",
        "120",
        "--json",
        str(out),
    )
    assert code == 0, text
    report = json.loads(out.read_text())
    s = report["summary"]
    assert (s["requests"], s["ok"], s["errors"], s["cut"]) == (12, 12, 0, 0)
    assert s["statuses"] == {"200": 12}
    reqs = report["requests"]
    assert [r["index"] for r in reqs] == list(range(12))
    for r in reqs:
        assert 4 <= r["new_tokens"] <= 24 and 4 <= r["prompt_tokens"] <= 24
        assert r["generated"] == r["new_tokens"], r  # every request generates exactly its length
        assert r["server_prompt_tokens"] == r["prompt_tokens"], r  # one token per prompt word
        assert 0 < r["ttft"] <= r["latency"]
        assert r["tpot"] > 0
    assert s["generated_tokens"] == sum(r["new_tokens"] for r in reqs)
    assert s["short"] == 0 and s["ttft_ms"]["n"] == 12 and s["itl_ms"]["n"] == sum(r["new_tokens"] - 1 for r in reqs)
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p90"] <= s["latency_ms"]["p99"]
    assert s["tokens_per_s"] > 0 and s["requests_per_s"] > 0
    assert report["info"]["model_id"] and "--stream" in report["argv"]
    assert "| Latency P50 (ms) | P90 (ms) | P99 (ms) |" in text and "Throughput (tokens/sec)" in text
    assert "| time to first token |" in text


def test_not_streamed_poisson(server, tmp_path):
    out = tmp_path / "run.json"
    code, text, _ = run_script(
        "--url",
        server.url,
        "--rate",
        "20",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "5,9,13",
        "--requests",
        "10",
        "--duration",
        "120",
        "--json",
        str(out),
    )
    assert code == 0, text
    report = json.loads(out.read_text())
    s = report["summary"]
    assert (s["requests"], s["ok"], s["errors"]) == (10, 10, 0)
    for r in report["requests"]:
        assert r["new_tokens"] in (5, 9, 13) and r["prompt_tokens"] == 8
        assert r["generated"] == r["new_tokens"]
        assert r["ttft"] is None and r["queue_ms"] is not None  # TTFT is not observable without streaming
    sent = [r["sent"] for r in report["requests"]]
    assert sent == sorted(sent) and sent[-1] > 0.05  # arrivals spread in time, not all at once
    assert "| time to first token | n/a |" in text


def test_queue_full_gives_429s_that_are_reported(tiny_model_dir, tmp_path):
    srv = ServerProcess(
        ["--model", str(tiny_model_dir), "--max-queued-requests", "1", "--max-new-tokens", "64"],
        free_port(),
        log_path=tmp_path / "server.log",
    )
    try:
        srv.wait_ready()
        out = tmp_path / "run.json"
        code, text, _ = run_script(
            "--url",
            srv.url,
            "--concurrency",
            "8",
            "--prompt-tokens",
            "8-16",
            "--new-tokens",
            "32",
            "--requests",
            "40",
            "--duration",
            "120",
            "--json",
            str(out),
        )
    finally:
        srv.stop()
    assert code == 1, text  # some requests failed: exit 1, with the report
    s = json.loads(out.read_text())["summary"]
    assert s["requests"] == 40 and s["ok"] + s["errors"] == 40
    assert s["statuses"].get("429", 0) > 0 and s["errors_by_kind"].get("429 overloaded") == s["statuses"]["429"]
    assert s["ok"] >= 1 and s["statuses"]["200"] == s["ok"]
    assert "429 overloaded" in text


def test_duration_bounds_the_run_and_cuts_what_is_left(server, tmp_path):
    out = tmp_path / "run.json"
    code, text, wall = run_script(
        "--url",
        server.url,
        "--stream",
        "--concurrency",
        "2",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "64",
        "--requests",
        "100000",
        "--duration",
        "1.5",
        "--drain",
        "0",
        "--json",
        str(out),
    )
    assert code == 0, text  # cut requests are not errors
    s = json.loads(out.read_text())["summary"]
    assert s["cut"] >= 1 and s["requests"] == s["answered"] + s["cut"] < 100000
    assert wall < 60


def test_refusals(server):
    code, text, _ = run_script("--url", server.url, "--new-tokens", "16-512")  # the server allows 64
    assert code == 2 and "the server allows 64" in text
    code, text, _ = run_script("--url", "http://10.1.2.3:8080")
    assert code == 2 and "not a loopback address" in text
    code, text, _ = run_script("--url", server.url, "--new-tokens", "9-3")
    assert code != 0 and "--new-tokens" in text


def test_workload_is_drawn_from_the_seed():
    def specs(seed: int, rate: float | None):
        args = load_test.parser().parse_args(
            ["--url", "http://127.0.0.1:1", "--seed", str(seed), "--prompt-tokens", "16-256", "--new-tokens", "16,512"]
            + (["--rate", str(rate)] if rate else [])
        )
        gen = load_test.workload(args, ["a", "b", "c"])
        return [next(gen) for _ in range(50)]

    a, b, c = specs(1, 4.0), specs(1, 4.0), specs(2, 4.0)
    assert [(s.prompt, s.new_tokens, s.at) for s in a] == [(s.prompt, s.new_tokens, s.at) for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert all(16 <= s.prompt_tokens <= 256 and len(s.prompt.split()) == s.prompt_tokens for s in a)
    assert {s.new_tokens for s in a} == {16, 512}
    assert all(x.at < y.at for x, y in zip(a, a[1:]))  # Poisson arrival times increase
    assert all(s.at == 0 for s in specs(1, None))
    with pytest.raises(SystemExit):
        load_test.parse_lengths("0-5", "--new-tokens")


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_check_under_load_equals_alone(server, tmp_path, stream):
    out = tmp_path / "run.json"
    code, text, _ = run_script(
        "--url",
        server.url,
        *(["--stream"] if stream else []),
        "--concurrency",
        "4",
        "--prompt-tokens",
        "1-24",
        "--new-tokens",
        "1-12",
        "--requests",
        "12",
        "--duration",
        "120",
        "--check-greedy",
        "5",
        "--json",
        str(out),
    )
    assert code == 0, text
    greedy = json.loads(out.read_text())["greedy_check"]
    assert (greedy["checked"], greedy["equal"], greedy["faults"], greedy["passed"]) == (5, 5, 0, True)
    assert [row["index"] for row in greedy["rows"]] == [0, 1, 2, 3, 4]
    assert "5 checked, 5 equal" in text


def test_part_step_finds_where_the_alone_tokens_leave_the_loaded_text():
    toks = [{"text": " a"}, {"text": " b"}, {"text": " c"}]
    assert load_test.part_step(toks, " a b c") is None
    assert load_test.part_step(toks, " a x c") == 1
    assert load_test.part_step(toks, " a b c d") == 3  # the alone run stopped short of the loaded text
    assert load_test.part_step(toks, "") == 0


@pytest.mark.parametrize("tie_gap, passed", [(1e9, True), (0.0, False)])
def test_greedy_check_diagnoses_a_difference_at_its_step(server, tie_gap, passed):
    """A text 'produced under load' that differs from the alone run: the check finds the step where the alone
    tokens leave it and the top-2 gap there, and calls it a near tie or a fault by --tie-gap."""
    import asyncio

    args = load_test.parser().parse_args(["--url", server.url, "--check-greedy", "1", "--tie-gap", str(tie_gap)])
    client = load_test.Client(server.url, args, force=True)
    spec = load_test.Spec(0, " the of and", 3, 6, 0.0)
    alone = asyncio.run(client.send(spec, time.perf_counter()))
    assert alone.ok and alone.text
    loaded = load_test.Result(0, 3, 6, status=200, text=alone.text[:1] + "\x00" + alone.text[2:])
    greedy = asyncio.run(load_test.check_greedy(client, {0: spec}, [loaded], args, server.url))
    row = greedy["rows"][0]
    assert not row["equal"] and "step" in row, json.dumps(row)
    assert row["step"] is not None and row["gap"] >= 0
    assert greedy["passed"] is passed and (greedy["near_ties"], greedy["faults"]) == ((1, 0) if passed else (0, 1))


@pytest.fixture(scope="module")
def fast_server(tiny_model_dir, tmp_path_factory):
    """The fast backend, continuous batching with chunked prefill and the prefix cache: the workloads' own target."""
    args = ["--model", str(tiny_model_dir), "--backend", "fast", "--batching", "continuous", "--max-input-length",
            "160", "--max-new-tokens", "64", "--max-total-tokens", "224", "--max-batch-size", "8",
            "--prefill-step-tokens", "24", "--prefill-chunk-tokens", "16", "--prefix-cache-mb", "2"]  # fmt: skip
    with ServerProcess(args, free_port(), log_path=tmp_path_factory.mktemp("logs") / "fast.log") as srv:
        yield srv


def test_standard_workload_streams_and_reports_ttft(fast_server, tmp_path):
    out = tmp_path / "run.json"
    code, text, _ = run_script("--url", fast_server.url, "--workload", "standard", "--concurrency", "4",
                               "--prompt-tokens", "4-24", "--new-tokens", "4-16", "--requests", "8", "--duration",
                               "120", "--json", str(out))  # fmt: skip
    assert code == 0, text
    report = json.loads(out.read_text())
    s = report["summary"]
    assert (s["ok"], s["errors"], s["workload"]) == (8, 0, "standard") and report["config"]["stream"]
    assert s["ttft_ms"]["n"] == 8 and s["ttft_ms"]["p50"] <= s["ttft_ms"]["p99"] and s["tokens_per_s"] > 0


def test_long_joiner_reports_the_live_rows_gaps_during_its_prefill(fast_server, tmp_path):
    out = tmp_path / "run.json"
    code, text, wall = run_script("--url", fast_server.url, "--workload", "long-joiner", "--live-rows", "4",
                                  "--joiner-tokens", "150", "--prompt-tokens", "4-8", "--new-tokens", "60",
                                  "--duration", "60", "--drain", "30", "--json", str(out))  # fmt: skip
    assert code == 0, text
    s = json.loads(out.read_text())["summary"]
    lj = s["long_joiner"]
    assert s["ok"] == 5 and s["requests"] == 5 and lj["joiner_ok"] and lj["live_rows"] == 4
    assert lj["joiner_prompt_tokens"] == 150 and lj["joiner_ttft_ms"] > 0
    assert lj["gaps_in_window"] >= 1 and lj["median_gap_ms"] > 0
    assert lj["ratio"] == pytest.approx(lj["largest_gap_in_window_ms"] / lj["median_gap_ms"])
    assert "long joiner: 150-token prompt" in text and wall < 120


def test_shared_prefix_prompts_share_their_first_tokens(fast_server, tmp_path):
    out = tmp_path / "run.json"
    code, text, _ = run_script("--url", fast_server.url, "--workload", "shared-prefix", "--stream", "--concurrency",
                               "4", "--prefix-tokens", "80", "--tail-tokens", "6", "--new-tokens", "4-8",
                               "--requests", "10", "--duration", "120", "--json", str(out))  # fmt: skip
    assert code == 0, text
    report = json.loads(out.read_text())
    assert report["summary"]["ok"] == 10 and report["summary"]["ttft_ms"]["n"] == 10
    assert all(r["server_prompt_tokens"] == r["prompt_tokens"] == 86 for r in report["requests"])
    status, metrics, _ = fast_server.get("/metrics")
    hits = next(ln for ln in metrics.splitlines() if ln.startswith("bloom_server_prefix_cache_hits_total "))
    assert float(hits.split()[1]) >= 6  # the first wave (4 clients) may all miss; the rest reuse the prefix
    args = load_test.parser().parse_args(["--url", "http://127.0.0.1:1", "--workload", "shared-prefix",
                                          "--prefix-tokens", "5", "--tail-tokens", "3"])  # fmt: skip
    gen = load_test.workload(args, ["a", "b", "c", "d"])
    specs = [next(gen) for _ in range(5)]
    assert len({s.prompt.split()[:5].__repr__() for s in specs}) == 1 and all(s.prompt_tokens == 8 for s in specs)


def test_limits_check_pairs_each_prompt_with_its_own_new_tokens():
    """The GPU prefill run's shape: 63 live rows of <= 64 + 512 tokens and a 1,500 + 4-token joiner fit a 1,600 total;
    the joiner's prompt with the live rows' 512 new tokens (2,012) is no request anyone sends."""
    info = {"max_input_tokens": 1536, "max_new_tokens": 512, "max_total_tokens": 1600}
    joiner = ["--url", "http://127.0.0.1:1", "--workload", "long-joiner", "--prompt-tokens", "16-64", "--new-tokens",
              "512", "--joiner-tokens", "1500"]  # fmt: skip
    assert load_test.over_limits(load_test.parser().parse_args(joiner), info) == []
    too_long = load_test.parser().parse_args(joiner + ["--joiner-new-tokens", "101"])
    assert load_test.over_limits(too_long, info) == [
        "prompt + new up to 1601 tokens, the server's max total is 1600 (serve --max-total-tokens)"
    ]
    standard = load_test.parser().parse_args(["--url", "http://127.0.0.1:1", "--prompt-tokens", "1100-1200",
                                              "--new-tokens", "16-512"])  # fmt: skip
    assert [m.split(",")[0] for m in load_test.over_limits(standard, info)] == ["prompt + new up to 1712 tokens"]
