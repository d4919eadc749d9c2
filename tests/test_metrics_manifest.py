"""Issue 18, items 5 and 6: the metric definitions (vLLM bench serve's, checked against the installed
vLLM's own code) and the reproducibility manifest in every export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.measure import metrics
from engines.measure.load import RequestRecord, summarize
from engines.measure.manifest import CPU_FLAGS_OF_INTEREST, MANIFEST_FIELDS, PACKAGES, build_manifest

ROOT = Path(__file__).resolve().parents[1]
# Two requests as (seconds since arrival, tokens) per streamed output; the second has a 2-token output.
CHUNKS = [[(0.10, 1), (0.15, 1), (0.21, 1), (0.30, 1)],
          [(0.40, 1), (0.50, 2), (0.55, 1)]]


def test_every_metric_is_defined_with_its_source_and_the_other_tools():
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", "goodput_req_s", "slo_attainment"):
        metric = metrics.METRICS[key]
        for name, value in metric.to_dict().items():
            assert value, (key, name)
    # The point of item 5: vLLM's TPOT is GuideLLM's and AIPerf's ITL.
    assert "ITL" in metrics.METRICS["tpot_ms"].guidellm and "ITL" in metrics.METRICS["tpot_ms"].aiperf
    assert metrics.label("ttft_ms").startswith("TTFT (ms): ")


def test_the_cited_vllm_code_says_what_the_definitions_say():
    """If vLLM changes how bench serve computes a metric, this names the line that moved."""
    import importlib.util
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        pytest.skip("vLLM is not installed")
    root = Path(spec.origin).parent
    serve = (root / "benchmarks" / "serve.py").read_text()
    request_func = (root / "benchmarks" / "lib" / "endpoint_request_func.py").read_text()
    assert "tpot = latency_minus_ttft / (output_len - 1)" in serve
    assert "latency_minus_ttft = outputs[i].latency - outputs[i].ttft" in serve
    assert "request_goodput=good_completed / dur_s" in serve
    assert "output.ttft = timestamp - st" in request_func
    assert "output.itl.append(timestamp - most_recent_timestamp)" in request_func
    assert "output.latency = most_recent_timestamp - st" in request_func
    assert 'VALID_NAMES = ["ttft", "tpot", "e2el"]' in serve


def test_per_request_metrics_and_goodput():
    first, second = (RequestRecord.from_chunks(0.0, chunks) for chunks in CHUNKS)
    assert first.num_tokens == 4 and first.ttft_s == 0.10 and first.e2el_s == 0.30
    assert first.tpot_s == pytest.approx(0.20 / 3)
    assert first.itls_s == pytest.approx([0.05, 0.06, 0.09])
    assert second.num_tokens == 4 and second.tpot_s == pytest.approx(0.15 / 3)
    assert len(second.itls_s) == 2  # a 2-token output is one gap, as vLLM counts it
    assert metrics.tpot_s([(0.2, 1)]) is None
    level = summarize([first, second], wall_s=1.0, serving="sequential", kv_peak=None, concurrency=2,
                      slos_ms={"ttft": 200.0, "tpot": 60.0})
    # first: TTFT 100 ms ok, TPOT 66.7 ms > 60: misses; second: TTFT 400 ms > 200: misses.
    assert (level.goodput_req_s, level.slo_attainment, level.meets_slo) == (0.0, 0.0, False)
    level = summarize([first, second], 1.0, "sequential", None, 2, slos_ms={"ttft": 500.0, "tpot": 70.0})
    assert (level.goodput_req_s, level.slo_attainment, level.meets_slo) == (2.0, 1.0, True)
    assert level.ttft_s_p50 == pytest.approx(0.25) and level.tpot_ms_p95 == pytest.approx(65.83, abs=0.01)


def test_slo_parsing_takes_ours_and_vllms_spelling():
    assert metrics.parse_slos("ttft_ms:500,tpot_ms:50") == {"ttft": 500.0, "tpot": 50.0}
    assert metrics.parse_slos("ttft:500 e2el:2000") == {"ttft": 500.0, "e2el": 2000.0}
    for bad, words in (("itl_ms:5", "NAME one of"), ("ttft_ms", "NAME one of"), ("ttft_ms:fast", "not a number"),
                       ("ttft_ms:-1", ">= 0"), ("tpot_ms:inf", "finite")):
        with pytest.raises(ValueError, match=words):
            metrics.parse_slos(bad)


@pytest.mark.slow
def test_our_numbers_equal_vllm_calculate_metrics():
    """The same two requests through vLLM's own calculate_metrics: TTFT, TPOT, ITL, E2EL and goodput agree."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics
    outputs = []
    for chunks in CHUNKS:
        times = [t for t, _ in chunks]
        outputs.append(RequestFuncOutput(success=True, latency=times[-1], ttft=times[0], prompt_len=5,
                                         output_tokens=sum(n for _, n in chunks),
                                         itl=[b - a for a, b in zip(times, times[1:])]))
    slos = {"ttft": 500.0, "tpot": 60.0}
    theirs, _ = calculate_metrics([], outputs, 2.0, None, [50, 95], slos)
    ours = summarize([RequestRecord.from_chunks(0.0, chunks) for chunks in CHUNKS], 2.0, "sequential", None, 2,
                     slos_ms=slos)
    assert ours.ttft_s_p50 * 1000 == pytest.approx(theirs.median_ttft_ms)
    assert ours.tpot_ms_p50 == pytest.approx(theirs.median_tpot_ms)
    assert ours.itl_ms_p50 == pytest.approx(theirs.median_itl_ms)
    assert ours.e2el_s_p50 * 1000 == pytest.approx(theirs.median_e2el_ms)
    assert ours.itl_ms_p95 == pytest.approx(dict(theirs.percentiles_itl_ms)[95])
    assert ours.goodput_req_s == pytest.approx(theirs.request_goodput) == 0.5
    assert ours.request_throughput == pytest.approx(theirs.request_throughput)


def test_docs_define_every_metric():
    text = (ROOT / "docs" / "metrics.md").read_text()
    assert metrics.to_markdown() in text, "docs/metrics.md lacks the current table: paste metrics.to_markdown()"
    assert "vLLM's TPOT is" in text


def test_the_manifest_holds_every_field():
    manifest = build_manifest(model="gemma-3-270m", engines={"vllm": {"kv_cache_dtype": "fp8"}}, seed=7, mode="load")
    assert set(MANIFEST_FIELDS) <= set(manifest)
    assert all(manifest[name] is not None for name in MANIFEST_FIELDS if name not in ("git_dirty",))
    assert len(manifest["git_commit"]) == 40 or manifest["git_commit"] == "unknown"
    assert set(manifest["versions"]) == set(PACKAGES) == {"torch", "transformers", "vllm", "bitsandbytes",
                                                            "gptqmodel", "llama_cpp"}
    assert all(version for version in manifest["versions"].values())
    assert set(manifest["cpu_flags"]) == set(CPU_FLAGS_OF_INTEREST)
    assert manifest["device_name"] and manifest["driver"]
    assert manifest["model"] == "gemma-3-270m" and manifest["model_source"]["hub_id"] == "google/gemma-3-270m"
    assert manifest["engines"] == {"vllm": {"kv_cache_dtype": "fp8"}}
    assert (manifest["seed"], manifest["mode"]) == (7, "load")
    json.dumps(manifest)  # an export writes it as it is


def test_engine_options_become_a_plain_dict():
    from engines.measure.manifest import engine_options_of
    from engines.variants.vllm.support import VllmOptions
    options = engine_options_of(type("E", (), {"options": VllmOptions.from_dict("vllm", {"kv_cache_gib": 1.0})})())
    assert options["kv_cache_gib"] == 1.0 and options["kv_cache_dtype"] == "auto"
    assert engine_options_of(object()) == {}


def test_the_manifest_says_unknown_outside_a_git_checkout(tmp_path):
    from engines.measure.manifest import git_commit
    assert git_commit(tmp_path) == ("unknown", None)


def test_bench_results_json_carries_the_manifest_and_reads_back(tmp_path):
    from engines.measure.bench import BenchConfig, BenchResult, BenchRow
    from engines.measure.report import write_outputs
    result = BenchResult(BenchConfig(engines=["bf16"], engine_options={"dtype": "bfloat16"}), "gemma-3-270m", "cpu",
                         {"date": "today"}, None, [BenchRow(engine="bf16", status="unavailable", reason="test")])
    paths = write_outputs(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(MANIFEST_FIELDS) <= set(data["manifest"])
    assert data["manifest"]["mode"] == "bench" and data["manifest"]["engines"] == {"bf16": {"dtype": "bfloat16"}}
    assert BenchResult.from_dict(data).rows[0].engine == "bf16"  # merging reads results.json back
