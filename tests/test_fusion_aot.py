"""The fused kernels compiled ahead of time for Hopper (sm_90) on a machine without a GPU: Triton's compiler and
ptxas run on the CPU (in a worker process without TRITON_INTERPRET, tests/conftest.py ``run_aot_script``), which
catches GPU-only compile errors that the interpreter hides, register spills and shared-memory overruns."""
from __future__ import annotations

from conftest import run_aot_script


_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusion_pass import kernels
tgt = GPUTarget("cuda", 90, 32)
p = "*bf16"
jobs = [(kernels.norm._rms_norm_kernel, {"x_ptr": p, "r_ptr": p, "g_ptr": p, "a_ptr": p, "h_ptr": p, "K": "i32",
                                         "eps": "fp32", "HAS_RES": "constexpr", "WEIGHT_FP32": "constexpr",
                                         "BLOCK_K": "constexpr"}, dict(HAS_RES=True, WEIGHT_FP32=False, BLOCK_K=1024),
         4, 1)]
for fn, sig, consts, warps, stages in jobs:
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=tgt,
                       options={"num_warps": warps, "num_stages": stages})
    assert "cubin" in c.asm
print("AOT-OK")
"""


def test_kernels_compile_for_sm90_ahead_of_time():
    """Compile the kernels to Hopper cubins without a GPU (in a subprocess without TRITON_INTERPRET): catches
    GPU-only compile errors that the interpreter hides."""
    run_aot_script(_AOT_SCRIPT, timeout=300)


_STREAM_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusion_pass import kernels
p = "*bf16"
sig = {"x_ptr": p, "r_ptr": p, "g_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": p, "h_ptr": p, "M": "i32", "N": "i32",
       "eps": "fp32", "K": "constexpr", "HAS_RES": "constexpr", "HAS_BIAS": "constexpr", "WRITE_H": "constexpr",
       "BM": "constexpr", "BN": "constexpr", "BKP": "constexpr", "USE_PDL": "constexpr", "G": "constexpr",
       "w1_ptr": p, "w2_ptr": p, "b1_ptr": p, "b2_ptr": p, "y1_ptr": p, "y2_ptr": p, "N1": "i32", "N2": "i32"}
names = list(sig)  # every pointer 16-byte aligned, as Triton specializes the tensors of a real launch
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n == "N"}
n = 0
for bm, cfgs in kernels.STREAM_CONFIGS.items():
    for bn, warps, _ in cfgs:
        for k, res, pdl in ((1024, True, False), (1024, False, True), (3072, True, False)):
            consts = dict(K=k, HAS_RES=res, HAS_BIAS=False, WRITE_H=res, BM=bm, BN=bn, BKP=triton.next_power_of_2(k),
                          USE_PDL=pdl, G=1)
            c = triton.compile(ASTSource(fn=kernels.gemv._fused_stream_kernel, signature=sig, constexprs=consts,
                                         attrs=attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": 1, "launch_pdl": pdl})
            assert "cubin" in c.asm, (bm, bn, warps, consts)
            assert ("griddepcontrol.wait" in c.asm["ptx"]) == pdl
            n += 1
# weight groups (q, k, v as one launch; K = 2048: the Llama-3.2-1B sites), with bias
for g in (2, 3):
    for bm, cfgs in kernels.STREAM_CONFIGS.items():
        bn, warps, _ = cfgs[0]
        consts = dict(K=2048, HAS_RES=True, HAS_BIAS=True, WRITE_H=True, BM=bm, BN=bn, BKP=2048, USE_PDL=True, G=g)
        c = triton.compile(ASTSource(fn=kernels.gemv._fused_stream_kernel, signature=sig, constexprs=consts,
                                     attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1, "launch_pdl": True})
        assert "cubin" in c.asm and "griddepcontrol.wait" in c.asm["ptx"], consts
        n += 1
print("AOT-OK", n)
"""


_SKINNY_AOT_SCRIPT = r"""
import os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusion_pass import kernels
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
p = "*bf16"
sig = {"x_ptr": p, "r_ptr": p, "g_ptr": p, "w_ptr": p, "b_ptr": p, "y_ptr": p, "h_ptr": p, "p_ptr": "*fp32",
       "q_ptr": "*fp32", "c_ptr": "*i32", "M": "i32", "N": "i32", "eps": "fp32", "K": "constexpr",
       "HAS_RES": "constexpr", "HAS_BIAS": "constexpr", "WRITE_H": "constexpr", "SPLIT": "constexpr",
       "IEEE": "constexpr", "BM": "constexpr", "BN": "constexpr", "KS": "constexpr", "USE_PDL": "constexpr",
       "FIXUP": "constexpr", "S": "constexpr"}
names = list(sig)
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n == "N"}
shapes = sorted({(max(16, b), c[0], c[1], c[2], bool(c[3:] and c[3])) for b, cfgs in kernels.SKINNY_CONFIGS.items()
                 for c in cfgs})
grp = {"G": "constexpr", "w1_ptr": p, "w2_ptr": p, "b1_ptr": p, "b2_ptr": p, "y1_ptr": p, "y2_ptr": p, "N1": "i32",
       "N2": "i32"}
sig = {**sig, **grp}
names = list(sig)  # every pointer 16-byte aligned, as Triton specializes the tensors of a real launch
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n == "N"}
n = 0
for bm, bn, ks, warps, fixup in shapes:
    for res, pdl, g in ((True, False, 1), (False, True, 1), (True, True, 3)):  # g = 3: a q, k, v weight group
        consts = dict(K=1024, HAS_RES=res, HAS_BIAS=g > 1, WRITE_H=res, SPLIT=ks < 1024, IEEE=False, BM=bm, BN=bn,
                      KS=ks, USE_PDL=pdl, FIXUP=fixup and ks < 1024, S=-(-1024 // ks), G=g)
        c = triton.compile(ASTSource(fn=kernels.skinny._fused_skinny_kernel, signature=sig, constexprs=consts,
                                     attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": 1, "launch_pdl": pdl})
        assert "cubin" in c.asm and "mma" in c.asm["ptx"], (bm, bn, ks, warps, consts)  # the tensor cores
        assert ("griddepcontrol.wait" in c.asm["ptx"]) == pdl
        assert ("atom.global.gpu.acq_rel.add" in c.asm["ptx"]) == consts["FIXUP"]  # the fixup's tile counter
        assert (bn + bm) * ks * 2 <= kernels.SKINNY_MAX_SMEM and c.metadata.shared <= kernels.SKINNY_MAX_SMEM
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            open(src, "w").write(c.asm["ptx"])
            out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True, check=True)
        info = out.stdout + out.stderr
        assert "0 bytes spill stores" in info, (bm, bn, ks, warps, res, info)
        n += 1
sig_e = {"p_ptr": "*fp32", "q_ptr": "*fp32", "b_ptr": p, "y_ptr": p, "M": "i32", "N": "i32", "eps": "fp32",
         "K": "constexpr", "S": "constexpr", "HAS_BIAS": "constexpr", "BLOCK": "constexpr", "USE_PDL": "constexpr",
         **grp}
for g in (1, 3):
    c = triton.compile(ASTSource(fn=kernels.skinny._fused_splitk_epilogue_kernel, signature=sig_e,
                                 constexprs=dict(K=1024, S=4, HAS_BIAS=True, BLOCK=1024, USE_PDL=True, G=g)),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "launch_pdl": True})
    assert "griddepcontrol.wait" in c.asm["ptx"]
print("AOT-OK", n)
"""


def test_skinny_kernel_compiles_for_sm90_without_spills():
    """The registered skinny configs (bf16, K = 1024: the Qwen3 fused sites) and the split-K epilogue compile to
    Hopper cubins without a GPU, on the tensor cores, with PDL where asked, within the shared-memory bound, and ptxas
    reports no register spills."""
    run_aot_script(_SKINNY_AOT_SCRIPT, timeout=600)


def test_stream_kernel_compiles_for_sm90_ahead_of_time():
    """The registered stream configs (bf16; K = 1024 and 3072, with and without the residual) compile to Hopper
    cubins without a GPU (subprocess without TRITON_INTERPRET)."""
    run_aot_script(_STREAM_AOT_SCRIPT, timeout=600)
