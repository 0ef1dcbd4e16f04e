"""The coconut backend on whole models: exactly 2L+1 sites (counted in depyf's post-grad dump and by the stats
API) and compiled == eager. HF transformers Qwen3/Llama (tiny, random, fp32) and a local replica of the engine's
Qwen3 forward (the norm forms of docs/contracts.md; merged qkv / gate_up weights; opaque attention stand-in); other
transformers families with their own norm forms and site counts (Gemma, Gemma 3, Gemma 4, OLMo 2, Cohere;
NanoChat and HRM-text, whose norms have no gain)."""
from __future__ import annotations

import glob
import os
import re

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusion_pass  # noqa: E402
from conftest import rel_err  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
LAYERS = 2


# Every test: no FX/AOT cache hits (the pass must run to be counted), fresh Dynamo state (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_compile_state")


def count_dump(dump_dir: str) -> dict[str, int]:
    """Count coconut calls and remaining mm/addmm in the post-grad graphs that depyf dumped."""
    files = glob.glob(os.path.join(dump_dir, "*AFTER_POST_GRAD*.py"))
    assert files, f"no post-grad dump in {os.listdir(dump_dir)}"
    text = "".join(open(f).read() for f in files)
    return {"coconut": len(re.findall(r"= torch\.ops\.coconut\.\w+\.default\(", text)),
            "residual": len(re.findall(r"= torch\.ops\.coconut\.add_rms_norm_linear\.default\(", text)),
            "mm": len(re.findall(r"= torch\.ops\.aten\.(?:mm|addmm)\.default\(", text))}


def compile_and_count(model, args, tmp_path, dynamic=None):
    import depyf

    dump = str(tmp_path / "depyf")
    with torch.no_grad():
        with depyf.prepare_debug(dump):
            compiled = torch.compile(model, backend="coconut", dynamic=dynamic)
            out = compiled(*args)
    return compiled, out, count_dump(dump)


HF_KW = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_hf_model_sites_and_numerics(arch, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**HF_KW, tie_word_embeddings=True))
        dense_left = 2 * LAYERS  # o_proj, down_proj per layer stay plain mm
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW,
                                                                       tie_word_embeddings=False))
        dense_left = 2 * LAYERS
    model = model.float().eval()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits

    def fwd(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits

    _, out, dump = compile_and_count(fwd, (ids,), tmp_path)
    assert fusion_pass.fused_site_count() == 2 * LAYERS + 1, fusion_pass.all_stats()
    assert dump["coconut"] == 2 * LAYERS + 1, dump
    assert dump["residual"] == 2 * LAYERS, dump  # every norm but the first one takes the residual add
    assert dump["mm"] == dense_left, dump
    assert sum(s["linears"] for s in fusion_pass.all_stats()) == LAYERS * 5 + 1
    assert rel_err(out, ref) <= 1e-5


# ---- a replica of the engine's Qwen3 forward, in the exact norm form of docs/contracts.md --------------------------


class EngineRMSNorm(nn.Module):
    def __init__(self, k: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(k))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = xf.to(dtype) * self.weight
        return out if residual is None else (out, residual)


class EngineLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int) -> None:
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, head_dim
        self.input_layernorm = EngineRMSNorm(hidden)
        self.post_attention_layernorm = EngineRMSNorm(hidden)
        self.qkv = nn.Parameter(torch.randn((heads + 2 * kv_heads) * head_dim, hidden) * hidden ** -0.5)
        self.o = nn.Parameter(torch.randn(hidden, heads * head_dim) * hidden ** -0.5)
        self.gate_up = nn.Parameter(torch.randn(2 * inter, hidden) * hidden ** -0.5)
        self.down = nn.Parameter(torch.randn(hidden, inter) * inter ** -0.5)
        self.q_norm = EngineRMSNorm(head_dim)
        self.k_norm = EngineRMSNorm(head_dim)

    def forward(self, x, residual):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        qkv = F.linear(x, self.qkv)
        q, k, v = qkv.split([self.h * self.d, self.kv * self.d, self.kv * self.d], -1)
        q = self.q_norm(q.view(-1, self.h, self.d))
        k = self.k_norm(k.view(-1, self.kv, self.d))
        v = v.view(-1, self.kv, self.d)
        # stand-in for the opaque paged attention op: non-linear use of q, k, v
        k = k.repeat_interleave(self.h // self.kv, 1)
        v = v.repeat_interleave(self.h // self.kv, 1)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) * self.d ** -0.5, -1)
        o = torch.einsum("hts,shd->thd", att, v).reshape(-1, self.h * self.d)
        x = F.linear(o, self.o)
        x, residual = self.post_attention_layernorm(x, residual)
        gate, up = F.linear(x, self.gate_up).chunk(2, -1)
        return F.linear(F.silu(gate) * up, self.down), residual


class EngineQwen3(nn.Module):
    def __init__(self, vocab=96, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, layers=LAYERS) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.randn(vocab, hidden) * 0.5)
        self.layers = nn.ModuleList(EngineLayer(hidden, heads, kv_heads, head_dim, inter) for _ in range(layers))
        self.norm = EngineRMSNorm(hidden)

    def forward(self, input_ids, last_idx):
        x = F.embedding(input_ids, self.embed)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual)
        x, residual = x[last_idx], residual[last_idx]
        x, _ = self.norm(x, residual)
        return F.linear(x, self.embed)  # tied lm_head


def test_engine_replica_sites_dynamic_tokens(tmp_path):
    torch.manual_seed(0)
    model = EngineQwen3().eval()
    ids, last = torch.randint(0, 96, (9,)), torch.tensor([3, 8])
    torch._dynamo.mark_dynamic(ids, 0)
    torch._dynamo.mark_dynamic(last, 0)
    compiled, out, dump = compile_and_count(model, (ids, last), tmp_path)
    assert fusion_pass.fused_site_count() == 2 * LAYERS + 1, fusion_pass.all_stats()
    assert dump["coconut"] == 2 * LAYERS + 1 and dump["mm"] == 2 * LAYERS, dump
    with torch.no_grad():
        assert rel_err(out, model(ids, last)) <= 1e-5
        ids2, last2 = torch.randint(0, 96, (13,)), torch.tensor([0, 5, 12])
        torch._dynamo.mark_dynamic(ids2, 0)
        torch._dynamo.mark_dynamic(last2, 0)
        assert rel_err(compiled(ids2, last2), model(ids2, last2)) <= 1e-5
    assert fusion_pass.fused_site_count() == 2 * LAYERS + 1  # no recompile for a new token count


# ---- other transformers families: norm forms beyond Llama/Qwen3 (tiny, random, fp32 unless said) ------------------


def hf_family(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random transformers model of the family, its norm gains moved away from their init (1 or 0) so that
    a wrong gain (w instead of 1 + w) changes the logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    window = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    model = {
        "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**HF_KW)),
        "gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**HF_KW, **window)),
        "gemma4": lambda: transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
            **HF_KW, **window, global_head_dim=16, hidden_size_per_layer_input=0)),
        "olmo2": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**HF_KW, pad_token_id=0)),
        "cohere": lambda: transformers.CohereForCausalLM(transformers.CohereConfig(**HF_KW, pad_token_id=0)),
        "nanochat": lambda: transformers.NanoChatForCausalLM(transformers.NanoChatConfig(**HF_KW)),
        "hrm_text": lambda: transformers.HrmTextForCausalLM(transformers.HrmTextConfig(
            **{k: v for k, v in HF_KW.items() if k != "num_key_value_heads"}, H_cycles=1, L_cycles=1)),
    }[name]()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn(p.shape))
    return model.to(dtype).eval()


# family -> (sites, residual_sites, norms_seen, mm left in the graph)
FAMILIES = {
    "gemma": (5, 4, 5, 4),  # gain 1 + w, computed in the graph
    "gemma3": (5, 4, 13, 4),  # (1 + w); post-attention / post-feedforward norms feed residual adds, q/k norms RoPE
    "gemma4": (5, 2, 15, 4),  # rsqrt spelled pow(., -0.5); gain w in fp32; v_norm (no gain) feeds attention
    "olmo2": (1, 1, 9, 14),  # norms after the projections: only the final norm -> lm_head is a site
    "cohere": (0, 0, 0, 15),  # LayerNorm (mean subtracted): never matched
    "nanochat": (5, 4, 10, 4),  # no gains; the norm of the embeddings feeds the residual, q/k norms attention
    "hrm_text": (9, 9, 10, 8),  # no gains; 2 calls of a 2-layer stack, the first one's final norm feeds the second
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_family_sites_and_numerics(family, tmp_path):
    """Each family fuses exactly its RMSNorm -> linear sites (depyf's post-grad dump and the stats agree), leaves
    every other norm alone with its reason, and compiled == eager in float32."""
    sites, residual, seen, mm_left = FAMILIES[family]
    model = hf_family(family)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    _, out, dump = compile_and_count(lambda i: model(input_ids=i, use_cache=False).logits, (ids,), tmp_path)
    (st,) = fusion_pass.all_stats()
    assert (st["sites"], st["residual_sites"], st["norms_seen"]) == (sites, residual, seen), st
    assert st["candidates"] == sites and len(st["skipped"]) == seen - sites, st
    assert all("not a linear" in r for r in st["skipped"]), st
    assert (dump["coconut"], dump["residual"], dump["mm"]) == (sites, residual, mm_left), dump
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("family", ["gemma", "nanochat"])
def test_float16_against_float32(family, tmp_path):
    """float16 against the float32 model: Gemma's (1 + w) gain is computed in fp32 (the torch.nn.RMSNorm form with
    an fp32 gain), NanoChat's norms have no gain and cast the normalized value back to float16; the fused model
    fuses every site and stays within 1e-2 of the float32 model, as eager float16 does."""
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_family(family)(input_ids=ids, use_cache=False).logits
    model = hf_family(family, torch.float16)
    _, out, dump = compile_and_count(lambda i: model(input_ids=i, use_cache=False).logits, (ids,), tmp_path)
    sites = FAMILIES[family][0]
    assert fusion_pass.fused_site_count() == sites and dump["coconut"] == sites, fusion_pass.all_stats()
    assert out.dtype == torch.float16 and rel_err(out, ref) <= 1e-2
