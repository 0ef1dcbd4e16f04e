"""Compile a Hugging Face model with the coconut backend and count the fused RMSNorm -> Linear sites."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fusion_pass  # noqa: F401 - registers backend="coconut"

config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 256, (1, 12))
compiled = torch.compile(model, backend="coconut")
# The graph compiles at the first call. A compile served from Inductor's FX-graph cache (a second run of this
# script) runs no pass and counts no site, so the cache is off here to count every run's sites.
with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
    ref, out = model(ids).logits, compiled(ids).logits
print("relative error:", ((out - ref).norm() / ref.norm()).item())
print("fused sites:", fusion_pass.fused_site_count())
