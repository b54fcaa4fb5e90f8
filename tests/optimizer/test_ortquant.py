"""Tests for optimizer/compress/ortquant.py: which INT8 kernels this CPU runs, read from its flags."""

from __future__ import annotations

from slimserve.optimizer.compress.ortquant import int8_kernels


def _cpuinfo(tmp_path, flags: str, key: str = "flags"):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\n{key}\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n{key}\t\t: fpu sse2 {flags}\n")
    return path


def test_int8_kernels_names_the_fastest_instructions_the_cpu_has(tmp_path):
    assert int8_kernels(_cpuinfo(tmp_path, "avx2 avx512f avx512_vnni amx_int8 amx_tile")) == "AMX + AVX-512 VNNI INT8 dot products"
    assert int8_kernels(_cpuinfo(tmp_path, "avx2 avx_vnni")) == "AVX-VNNI INT8 dot products"
    assert int8_kernels(_cpuinfo(tmp_path, "asimd asimddp i8mm", key="Features")) == "Arm I8MM + Arm SDOT INT8 dot products"


def test_int8_kernels_without_vnni_suggests_reduce_range(tmp_path):
    assert "without VNNI" in int8_kernels(_cpuinfo(tmp_path, "avx2 fma")) and "reduce_range" in int8_kernels(_cpuinfo(tmp_path, "avx2"))
    assert int8_kernels(_cpuinfo(tmp_path, "sse4_2")) == "no INT8 dot-product instructions found (no VNNI / AMX / SDOT)"
    assert int8_kernels(tmp_path / "missing") == "unknown (no /proc/cpuinfo)"


def test_cpu_isa_names_the_model_and_the_instruction_sets(tmp_path):
    from slimserve.optimizer.compress.ortquant import cpu_isa

    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_isa(path) == "AMD EPYC 7B13: AVX2, FMA"
    path.write_text("processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: avx2 fma avx512f avx512_vnni amx_int8 amx_bf16\n")
    assert cpu_isa(path) == "Intel Xeon: AVX2, FMA, AVX-512, AVX-512 VNNI, AMX-INT8, AMX-BF16"
    assert "no /proc/cpuinfo flags" in cpu_isa(tmp_path / "missing")
