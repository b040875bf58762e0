"""bench/kernel_profile.py, which docs/benchmarks.md's serving profile rests on: kernel kinds by the names
vLLM 0.26's kernels had in an H200 trace, and busy time with two streams overlapping."""
import gzip
import json
from pathlib import Path

import pytest

from tests.helpers import bench_module

kernel_profile = bench_module("kernel_profile")

FP8_GEMM = "void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8<cutlass::float_e4m3_t, cutlass::bfloat16_t>>"
NORM_QUANT = ("triton_red_fused__to_copy_abs_clamp_cutlass_scaled_mm_div_fused_add_rms_norm_max_mul_reciprocal_"
              "unsqueeze_3")


@pytest.mark.parametrize("name, kind", [
    (FP8_GEMM, "gemm"),
    ("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_splitK_TNT", "gemm"),
    (NORM_QUANT, "quantization"),  # Inductor's name lists the scaled_mm it was fused in front of
    ("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<>>>", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>", "attention"),
    ("_lora_shrink_kernel", "lora"),
    ("triton_red_fused_fused_add_rms_norm_2", "triton"),
    ("_gumbel_sample_kernel", "sampling"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_kernels_are_sorted_into_kinds_by_their_names(name, kind):
    assert kernel_profile.kind(name) == kind


def _trace(tmp_path, events) -> Path:
    path = tmp_path / "rank0.1.pt.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return path


def test_busy_time_counts_overlapping_streams_once_and_host_events_not_at_all(tmp_path):
    def kernel(name, ts, dur, stream):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": stream}
    events = [kernel(FP8_GEMM, 0, 60, 7), kernel("_lora_shrink_kernel", 40, 40, 9),  # 0-80 busy, 20 overlapping
              kernel(NORM_QUANT, 100, 20, 7),  # 80-100 idle
              {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},
              {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 190, "dur": 10}]  # 120-190 idle
    summary = kernel_profile.summarize(_trace(tmp_path, events), steps=2)
    assert summary["window_ms"] == pytest.approx(0.2)
    assert summary["gpu_busy_share"] == pytest.approx(110 / 200)
    assert summary["idle_ms_per_step"] == pytest.approx(0.045)
    assert summary["kernel_ms_per_step"] == pytest.approx(
        {"gemm": 0.03, "lora": 0.02, "quantization": 0.01, "memcpy": 0.005})
    assert [k["kernel"] for k in summary["largest"]][:2] == [FP8_GEMM, "_lora_shrink_kernel"]


def test_a_trace_without_gpu_kernels_says_so(tmp_path):
    summary = kernel_profile.summarize(_trace(tmp_path, [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]), 1)
    assert "no GPU kernels" in summary["error"]
