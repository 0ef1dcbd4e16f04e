"""The fused q/k RMSNorm + RoPE kernel (nanovllm/kernels/qk_norm_rope.py) against the model's PyTorch path, in the
Triton interpreter on the CPU (float32 / float16), and its op under torch.compile. The GPU test (bf16 and the
engine's tokens against transformers) runs only where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err, run_aot_script
from nanovllm.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.rotary_embedding import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(t: int, h: int, hkv: int, d: int, dtype: torch.dtype, seed: int, row_pad: int = 0):  # noqa: ANN201
    """qkv [t, (h + 2 hkv) d] (a column slice of a wider buffer when row_pad > 0), norm weights, rope table,
    positions."""
    g = torch.Generator().manual_seed(seed)
    width = (h + 2 * hkv) * d
    buf = torch.randn(t, width + row_pad, generator=g) * 3
    qkv = buf.to(dtype)[:, :width]
    qw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    kw = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype)
    rope = RotaryEmbedding(d, 4096, 1_000_000.0)
    positions = torch.randint(0, 4096, (t,), generator=g)
    return qkv, qw, kw, rope, positions


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3)])  # fp16: bit-exact in the interpreter today
@pytest.mark.parametrize("t, h, hkv, d", [(1, 16, 8, 128), (5, 4, 2, 64), (9, 14, 2, 64), (3, 8, 8, 32)])
def test_kernel_matches_the_model_path(dtype: torch.dtype, tol: float, t: int, h: int, hkv: int, d: int) -> None:
    qkv, qw, kw, rope, positions = make(t, h, hkv, d, dtype, seed=t * 100 + h, row_pad=16 if t % 2 else 0)
    q, k = qk_norm_rope(qkv, qw, kw, rope.cos_sin_cache, positions, h, hkv, 1e-6, force_triton=True)
    # the model's own modules, as Qwen3Attention runs them without the fused op
    qn, kn = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
    qn.weight.data, kn.weight.data = qw.clone(), kw.clone()
    q_ref = qn(qkv[:, :h * d].reshape(t, h, d))
    k_ref = kn(qkv[:, h * d:(h + hkv) * d].reshape(t, hkv, d))
    q_ref, k_ref = rope(positions, q_ref, k_ref)
    assert q.shape == (t, h, d) and k.shape == (t, hkv, d) and q.dtype == k.dtype == dtype
    assert rel_err(q, q_ref) <= tol and rel_err(k, k_ref) <= tol
    # the reference function is the same computation
    q2, k2 = qk_norm_rope_ref(qkv, qw, kw, rope.cos_sin_cache, positions, h, hkv, 1e-6)
    assert torch.equal(q2, q_ref) and torch.equal(k2, k_ref)


def test_position_matters_and_v_is_untouched() -> None:
    qkv, qw, kw, rope, _ = make(2, 4, 2, 64, torch.float32, seed=1)
    qkv[1] = qkv[0]
    before = qkv.clone()
    q, k = qk_norm_rope(qkv, qw, kw, rope.cos_sin_cache, torch.tensor([0, 7]), 4, 2, 1e-6, force_triton=True)
    assert torch.equal(qkv, before)
    assert not torch.allclose(q[0], q[1]) and not torch.allclose(k[0], k[1])
    q0, _ = qk_norm_rope(qkv, qw, kw, rope.cos_sin_cache, torch.tensor([0, 0]), 4, 2, 1e-6, force_triton=True)
    assert torch.allclose(q0[0], q0[1])  # same token, same position: same output
    # position 0 is the identity rotation: the output is the normalized head
    n = qkv[0, :64].float() * torch.rsqrt(qkv[0, :64].float().pow(2).mean() + 1e-6) * qw
    assert rel_err(q[0, 0], n) <= 1e-6


def test_bad_arguments_raise() -> None:
    qkv, qw, kw, rope, positions = make(3, 4, 2, 64, torch.float32, seed=2)
    cs = rope.cos_sin_cache
    with pytest.raises(ValueError, match="qkv"):
        qk_norm_rope(qkv[:, :-1], qw, kw, cs, positions, 4, 2, 1e-6)
    with pytest.raises(ValueError, match="weights"):
        qk_norm_rope(qkv, qw, kw[:32], cs, positions, 4, 2, 1e-6)
    with pytest.raises(ValueError, match="cos_sin"):
        qk_norm_rope(qkv, qw, kw, cs.double(), positions, 4, 2, 1e-6)
    with pytest.raises(ValueError, match="positions"):
        qk_norm_rope(qkv, qw, kw, cs, positions[:2], 4, 2, 1e-6)


def test_op_traces_with_symbolic_tokens() -> None:
    """The op's fake implementation keeps one graph for every token count (dynamic=True, fullgraph)."""
    import nanovllm.layers.qk_norm_rope_op  # noqa: F401 - registers the op

    def f(qkv, qw, kw, cs, pos):  # noqa: ANN001, ANN202
        q, k = torch.ops.nanovllm.qk_norm_rope(qkv, qw, kw, cs, pos, 4, 2, 1e-6)
        return q.sum(-1) + 1, k * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for t in (3, 7):
        qkv, qw, kw, rope, positions = make(t, 4, 2, 64, torch.float32, seed=t)
        got = compiled(qkv, qw, kw, rope.cos_sin_cache, positions)
        want = f(qkv, qw, kw, rope.cos_sin_cache, positions)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_and_engine_tokens_on_gpu(tiny_ckpt: str) -> None:
    qkv, qw, kw, rope, positions = make(37, 16, 8, 128, torch.bfloat16, seed=5)
    args = (qkv.cuda(), qw.cuda(), kw.cuda(), rope.cos_sin_cache.cuda(), positions.cuda(), 16, 8, 1e-6)
    q, k = qk_norm_rope(*args)
    q_ref, k_ref = qk_norm_rope_ref(*args)
    assert rel_err(q, q_ref) <= 1e-2 and rel_err(k, k_ref) <= 1e-2
    # the engine with the fused op (tiny fp32, CUDA graphs) gives the greedy tokens of transformers
    from conftest import hf_greedy, random_prompts
    from transformers import AutoModelForCausalLM

    from nanovllm import LLM, SamplingParams

    prompts = random_prompts([5, 40, 90], seed=3)
    llm = LLM(tiny_ckpt, dtype="float32", max_model_len=256, max_num_seqs=8)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    assert [o["token_ids"] for o in outs] == [hf_greedy(hf, p, 12) for p in prompts]


_AOT_SCRIPT = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
m = importlib.import_module("nanovllm.kernels.qk_norm_rope")
fn = m._qk_norm_rope_kernel
types = {"qkv_ptr": "*bf16", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "cs_ptr": "*fp32", "pos_ptr": "*i64",
         "q_ptr": "*bf16", "k_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16", "slot_ptr": "*i32",
         "stride_t": "i32", "stride_cs": "i32", "eps": "fp32"}
# with programmatic dependent launch (fusion_pass/launch.py): griddepcontrol in the PTX; with and without the store
# and the norm (RoPE only: the Llama family)
for pdl, store, norm in ((False, False, True), (True, False, True), (True, True, True), (True, True, False)):
    consts = dict(NUM_HEADS=16, NUM_KV_HEADS=8, ROWS=32, KV_ROWS=8, HALF=64, STORE=store, NORM=norm, USE_PDL=pdl)
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "launch_pdl": pdl})
    assert "cubin" in c.asm
    assert ("griddepcontrol.wait" in c.asm["ptx"]) == pdl
print("AOT-OK")
"""


def test_kernel_compiles_for_sm90_ahead_of_time() -> None:
    """Compile to a Hopper cubin without a GPU (subprocess without TRITON_INTERPRET): GPU-only compile errors."""
    run_aot_script(_AOT_SCRIPT, timeout=600)