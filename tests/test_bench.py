"""The headless benchmark (issue 7) on the real embedded model and real engines, the dummy-weights path on a
small random Llama shape, and the roofline arithmetic."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from engines.measure.bench import BenchConfig, build_prompt, run_bench
from engines.measure.roofline import decode_roofline, measure_bandwidth
from engines.models.sources import load_shape
from engines.protocol import EngineError
from engines.registry import create_engine, list_engines, split_variant

MAX_NEW_TOKENS = 8
AVAILABLE = {row["name"] for row in list_engines() if row["is_available"]}
# The second engine: llama.cpp on the shipped GGUF when it is installed (issue 15: its row beside bf16's),
# else a quantized one, else the speculative one (all real engines).
SECOND_ENGINE = next(name for name in ("gguf", "nf4", "int8", "spec", "bf16-compiled") if name in AVAILABLE)
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def cli_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "engines", "bench", "--engines", f"bf16,{SECOND_ENGINE},no-such-engine",
         "--max-new-tokens", str(MAX_NEW_TOKENS), "--prompt-tokens", "96", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900)
    return out, done


def test_bench_writes_every_file_and_prints_the_table_last(cli_bench):
    out, done = cli_bench
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("results.json", "results.csv", "results.md", "plots.html"):
        assert (out / name).stat().st_size > 0, name
    for name in ("speed", "memory", "roofline", "quality"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["bf16", SECOND_ENGINE, "no-such-engine"]
    assert "unknown engine 'no-such-engine'" in table[3]
    assert done.stdout.strip().endswith((out / "results.md").read_text().strip())
    assert "[progress]" in done.stderr and "Traceback" not in done.stderr
    with open(out / "results.csv") as handle:
        assert [row["engine"] for row in csv.DictReader(handle)] == ["bf16", SECOND_ENGINE, "no-such-engine"]


def test_bench_numbers_are_positive(cli_bench):
    out, _ = cli_bench
    result = json.loads((out / "results.json").read_text())
    assert result["bandwidth"]["bandwidth_gb_s"] > 0
    ran = [row for row in result["rows"] if row["status"] == "ok"]
    assert [row["engine"] for row in ran] == ["bf16", SECOND_ENGINE]
    for row in ran:
        for key in ("load_s", "ttft_s", "decode_tok_s", "prefill_s", "encode_peak_gib", "generate_peak_gib",
                    "weight_footprint_gib", "roofline_tok_s", "roofline_frac", "read_per_token_gib"):
            assert row[key] > 0, (row["engine"], key)
        assert 1 <= row["num_tokens"] <= MAX_NEW_TOKENS
        assert row["prefill_tokens"] >= 96
    # Quality is on in this run (no --no-quality), and bf16 is the reference: it agrees with itself on
    # every token. A quality pass that failed or went missing leaves None here and fails the test.
    bf16, second = ran
    assert bf16["greedy_agreement"] == 1.0 and bf16["perplexity"] > 1, bf16
    assert bf16["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3), bf16
    assert 0 <= second["greedy_agreement"] <= 1 and second["perplexity"] > 1, second
    if SECOND_ENGINE == "gguf":  # the shipped Q4_K_M file is far smaller than the BF16 weights
        from engines.models.sources import resolve_model
        file_gib = resolve_model().gguf_path.stat().st_size / 2**30
        assert second["weight_footprint_gib"] == pytest.approx(file_gib)
        assert second["weight_footprint_gib"] < 0.6 * bf16["weight_footprint_gib"]
        ratio = second["decode_tok_s"] / bf16["decode_tok_s"]
        print(f"\ngguf against bf16 in one bench run: {ratio:.2f}x decode tok/s")


def test_dummy_weights_bench_generates_exactly_n_tokens(tmp_path):
    config_path = tmp_path / "tiny-llama.json"
    config_path.write_text(json.dumps(TINY_LLAMA))
    # bf16 builds the random model in place; nf4 (bitsandbytes reads files only) gets saved random weights.
    engines = ["bf16"] + (["nf4"] if "nf4" in AVAILABLE else [])
    result = run_bench(BenchConfig(engines=engines, max_new_tokens=24, prompt_tokens=64, num_repeats=1,
                                   dummy_config=str(config_path)))
    assert result.model == "dummy:tiny-llama" and [row.engine for row in result.rows] == engines
    for row in result.rows:
        assert row.status == "ok", row.reason
        assert row.num_tokens == 24      # EOS lies outside the shape's vocab, so a random model never stops early
        assert row.quality_note == "n/a (random weights)" and row.perplexity is None
        assert row.decode_tok_s > 0 and row.roofline_frac > 0


def test_prompt_stays_inside_a_smaller_vocabulary(bf16_engine):
    prompt = build_prompt(bf16_engine.tokenizer, 300, vocab_size=32000)
    ids = bf16_engine.tokenizer(prompt).input_ids
    assert 300 <= len(ids) < 310 and max(ids) < 32000


def test_roofline_counts_quantized_weights_and_fp8_kv():
    # Bytes come from each engine's own resolved options (created, not loaded), never from its name.
    shape = load_shape("llama-3-8b")
    bf16 = decode_roofline(shape, create_engine("bf16").precision(), bandwidth_gb_s=3000, context_tokens=1024)
    assert bf16.weight_bytes == 2 * (shape.num_linear_params + shape.num_lm_head_params)
    assert bf16.kv_bytes == 1024 * 128 * 1024                       # 128 KiB per token in BF16
    assert bf16.roofline_tok_s == pytest.approx(3000e9 / (bf16.weight_bytes + bf16.kv_bytes))
    fp8 = create_engine("vllm", kv_cache_dtype="fp8").precision()
    assert decode_roofline(shape, fp8, 3000, 1024).kv_bytes == bf16.kv_bytes / 2
    assert decode_roofline(shape, create_engine("vllm").precision(), 3000, 1024).kv_bytes == bf16.kv_bytes
    int4 = decode_roofline(shape, create_engine("gptq-int4").precision(), 3000, 1024)
    assert 2.5 < int4.roofline_tok_s / bf16.roofline_tok_s < 3.5     # INT4 body, BF16 head


def test_cpu_bandwidth_is_measured():
    bandwidth = measure_bandwidth("cpu", copy_bytes=64 * 1024 ** 2, num_repeats=3)
    assert bandwidth.bandwidth_gb_s > 0.1 and "RAM" in bandwidth.method


@pytest.mark.parametrize("arguments, message", [
    (["--engines", " , "], "name at least one engine"),
    (["--engines", "bf16", "--dummy-weights", "no-such-shape"], "config 'no-such-shape' not found"),
    (["--engines", "bf16", "--max-new-tokens", "0"], "max_new_tokens must be between 1"),
])
def test_bench_bad_input_is_a_clear_message(arguments, message, tmp_path):
    done = subprocess.run([sys.executable, "-m", "engines", "bench", *arguments, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_bench_tab_explains_bad_input_without_a_traceback(tmp_path):
    from app import bench_tab
    (failed,) = list(bench_tab.run_bench_events([], 4, 32, 1, bench_tab.REAL_WEIGHTS, False, out_root=str(tmp_path)))
    assert failed[0] == "**Bench failed:** name at least one engine (see `python -m engines list`)"
    (failed,) = list(bench_tab.run_bench_events(["bf16"], "many", 32, 1, bench_tab.REAL_WEIGHTS, False))
    assert failed[0].startswith("**Cannot run:**")


def test_bench_tab_runs_in_a_real_browser(tmp_path):
    import gradio as gr
    from playwright.sync_api import sync_playwright

    from app import bench_tab
    from app.callbacks import AppConfig
    with gr.Blocks() as demo:
        bench_tab.build(AppConfig(export_dir=str(tmp_path)))
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(tmp_path)])
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(demo.local_url)
            page.locator("#bench-max-new-tokens input").fill("4")
            page.locator("#bench-prompt-tokens input").fill("32")
            page.get_by_label("Quality against bf16").uncheck()
            page.locator("#bench-run").click()
            page.wait_for_function("document.querySelector('#bench-status').innerText.includes('Done')",
                                   timeout=300_000)
            assert "Done: 1 of 1 engines measured." in page.locator("#bench-status").inner_text()
            rows = page.locator("#bench-table table tbody tr")
            assert rows.count() == 1 and rows.first.locator("td").first.inner_text() == "bf16"
            assert "results.csv" in page.locator("#bench-files").inner_text().replace("\n", "")
            page.wait_for_selector("#bench-speed .js-plotly-plot", timeout=30_000)
            browser.close()
    finally:
        demo.close()


def _bench_cli(*arguments, timeout=900):
    return subprocess.run([sys.executable, "-m", "engines", "bench", *arguments], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_isolated_bench_gives_each_engine_its_own_process_options_and_profile(tmp_path):
    out = tmp_path / "iso"
    done = _bench_cli("--engines", "bf16[attn_implementation=eager],no-such-engine", "--isolate", "--budget-s", "600",
                      "--max-new-tokens", "4", "--prompt-tokens", "16", "--repeats", "1", "--no-quality", "--profile",
                      "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["engine"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    eager = rows["bf16[attn_implementation=eager]"]
    assert eager["status"] == "ok" and eager["num_tokens"] == 4
    assert eager["kernel_launches_per_token"] > 10 and eager["cpu_ms_per_token"] > 0
    assert rows["no-such-engine"]["status"] == "error" and "unknown engine" in rows["no-such-engine"]["reason"]
    assert (out / "engines" / "bf16_attn_implementation_eager_" / "results.json").is_file()
    # --merge reads the per-engine folders back, in the order given.
    merged = tmp_path / "merged"
    done = _bench_cli("--merge", str(out / "engines" / "no-such-engine"),
                      str(out / "engines" / "bf16_attn_implementation_eager_"), "--out", str(merged))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [row["engine"] for row in json.loads((merged / "results.json").read_text())["rows"]] == \
        ["no-such-engine", "bf16[attn_implementation=eager]"]


def test_an_engine_past_its_budget_is_a_row_saying_so(tmp_path):
    done = _bench_cli("--engines", "bf16", "--isolate", "--budget-s", "0.5", "--no-quality", "--out", str(tmp_path))
    assert done.returncode == 1
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["status"] == "error" and "stopped after its budget" in row["reason"], row


@pytest.mark.parametrize("engines, message", [
    ("bf16[attn_implementation=eager", "options go in brackets"),
    ("bf16[eager]", "each option is KEY=VALUE"),
])
def test_malformed_variant_options_are_refused(engines, message):
    with pytest.raises(EngineError, match=message):
        split_variant(engines)
