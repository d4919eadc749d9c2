"""KV-cache calculator and model shapes against hand-computed values (issue 7), and the `kv` command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engines.measure.kv_calc import calculate, kv_bytes, max_tokens
from engines.models.shape import available_configs, shape_from_config
from engines.models.sources import load_config, load_shape
from engines.protocol import EngineError

GIB = 1024 ** 3


def _row(report, layout, dtype):
    return next(row for row in report.rows if row.layout == layout and row.kv_dtype == dtype)


def test_llama_7b_is_512_kib_per_token_in_half_precision():
    # The seed's example: hidden 4096 = 32 heads x 128, 32 layers: 2 (K and V) * 4096 * 32 * 2 bytes.
    report = calculate(load_shape("llama-2-7b"), vram_gib=80, context_tokens=4096)
    assert report.attention_layout == "MHA"
    assert [row.layout for row in report.rows] == ["MHA", "MHA"]
    bf16, fp8 = _row(report, "MHA", "BF16"), _row(report, "MHA", "FP8")
    assert bf16.kv_bytes_per_token == 2 * 4096 * 32 * 2 == 512 * 1024
    assert fp8.kv_bytes_per_token == 256 * 1024
    assert bf16.kv_bytes_per_1k == 512 * 1024 ** 2
    assert bf16.kv_bytes_at_context == 2 * GIB
    assert bf16.max_tokens_in_vram == 80 * GIB // (512 * 1024) == 163_840
    assert fp8.max_tokens_in_vram == 2 * bf16.max_tokens_in_vram
    assert 0 < bf16.max_tokens_beside_weights < bf16.max_tokens_in_vram


def test_llama_3_8b_gqa_is_a_quarter_of_mha():
    report = calculate(load_shape("llama-3-8b"), vram_gib=24, context_tokens=8192)
    assert report.attention_layout == "GQA" and report.num_kv_heads == 8
    assert _row(report, "GQA", "BF16").kv_bytes_per_token == 2 * 8 * 128 * 32 * 2 == 128 * 1024
    assert _row(report, "MHA", "BF16").kv_bytes_per_token == 4 * _row(report, "GQA", "BF16").kv_bytes_per_token
    assert 7.9e9 < load_shape("llama-3-8b").num_params < 8.1e9


def test_embedded_gemma_counts_sliding_layers_at_their_window():
    shape = load_shape("gemma-3-270m")
    assert (shape.num_layers, shape.num_sliding_layers, shape.sliding_window) == (18, 15, 512)
    assert (shape.num_kv_heads, shape.head_dim, shape.attention_layout) == (1, 256, "MQA")
    per_layer_token = 2 * 1 * 256 * 2
    report = calculate(shape, vram_gib=1, context_tokens=300)
    mqa = _row(report, "MQA", "BF16")
    assert mqa.kv_bytes_per_token == 18 * per_layer_token == 18432
    assert mqa.kv_bytes_at_context == 300 * 18 * per_layer_token            # inside the window: every layer
    assert mqa.kv_bytes_per_1k == (3 * 1024 + 15 * 512) * per_layer_token    # beyond it: 3 full layers grow
    assert _row(report, "MHA", "BF16").kv_bytes_per_1k == 4 * mqa.kv_bytes_per_1k
    budget = GIB
    expected = (budget - 15 * 512 * per_layer_token) // (3 * per_layer_token)
    assert max_tokens(shape, budget, 2) == expected
    assert kv_bytes(shape, expected, 2) <= budget < kv_bytes(shape, expected + 1, 2)


def test_linear_parameter_count_matches_the_real_architecture():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    for name in ("gemma-3-270m", "llama-3-8b"):
        _, config_dict = load_config(name)
        config_dict = {key: value for key, value in config_dict.items() if not key.startswith("_")}
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        linear = sum(module.weight.numel() for module_name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and not module_name.endswith("lm_head"))
        assert load_shape(name).num_linear_params == linear, name


def test_shipped_configs_and_bad_input():
    assert {"llama-3-8b", "qwen2.5-7b", "llama-2-7b"} <= set(available_configs())
    assert load_shape("qwen2.5-7b").num_sliding_layers == 0   # use_sliding_window is false
    with pytest.raises(EngineError, match="not found"):
        load_shape("no-such-model")
    with pytest.raises(EngineError, match="lacks hidden_size"):
        shape_from_config({"num_hidden_layers": 2}, "broken")


def test_kv_command_prints_the_table_and_rejects_bad_numbers():
    done = subprocess.run([sys.executable, "-m", "engines", "kv", "--config", "llama-2-7b", "--vram-gib", "80"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| MHA | 32 | BF16 | 512.0 KiB | 512.0 MiB |" in done.stdout
    for vram_gib in ("-1", "nan", "inf"):
        bad = subprocess.run([sys.executable, "-m", "engines", "kv", "--config", "llama-2-7b", "--vram-gib", vram_gib],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        assert f"--vram-gib must be positive and finite, got {float(vram_gib)}" in bad.stderr, bad.stderr


def test_calculate_rejects_memory_and_context_it_cannot_price():
    shape = load_shape("llama-2-7b")
    for vram_gib in (0, -3, float("nan"), float("inf")):
        with pytest.raises(EngineError, match="positive number of GiB"):
            calculate(shape, vram_gib=vram_gib)
    with pytest.raises(EngineError, match="positive number of tokens, got 0"):
        calculate(shape, context_tokens=0)


def test_kv_tab_reports_and_charts_and_explains_bad_input():
    import gradio as gr

    from app import kv_tab
    report, chart = kv_tab.calculate_kv("llama-2-7b", 80, 4096)
    assert "| MHA | 32 | BF16 | 512.0 KiB |" in report
    assert len(chart.data) == 2 and max(chart.data[0].y) == pytest.approx(2.0)   # 4096 tokens * 512 KiB
    message, chart = kv_tab.calculate_kv("llama-2-7b", 0, 4096)
    assert message.startswith("**Cannot calculate:**") and chart is None
    message, _ = kv_tab.calculate_kv("no-such-config", 80, 4096)
    assert "not found" in message
    with gr.Blocks():
        kv_tab.build()


def test_kv_tab_in_a_real_browser():
    import gradio as gr
    from playwright.sync_api import sync_playwright

    from app import kv_tab
    with gr.Blocks() as demo:
        kv_tab.build()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(demo.local_url)
            assert "llama-3-8b" in page.locator("#kv-report").inner_text()   # the default shape, shown on load
            config_box = page.locator("#kv-config input")
            config_box.fill("llama-2-7b")
            config_box.press("Enter")
            page.locator("#kv-context input").fill("4096")
            page.locator("#kv-calculate").click()
            page.wait_for_function("document.querySelector('#kv-report').innerText.includes('llama-2-7b')",
                                   timeout=30_000)
            page.wait_for_function("document.querySelector('#kv-report').innerText.includes('at 4,096 tokens')",
                                   timeout=30_000)
            report = page.locator("#kv-report").inner_text()
            assert "512.0 KiB" in report and "2.0 GiB" in report and "GQA" not in report
            page.locator("#kv-vram-gib input").fill("-5")
            page.locator("#kv-calculate").click()
            page.wait_for_function("document.querySelector('#kv-report').innerText.includes('Cannot calculate')",
                                   timeout=30_000)
            browser.close()
    finally:
        demo.close()
