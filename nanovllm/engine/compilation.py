"""Compiling the model and tuning the fused kernels: the forward callables that a model runner calls.

Decode steps run ``forward``: the model compiled as one graph (Inductor on the GPU, or the ``coconut`` backend with
``compile_fusion``), or the eager model. Prefill steps run ``prefill_forward``: the same callable, except with
``compile_fusion`` on the GPU, where it is the model compiled by plain Inductor. The fused kernels pay at decode
sizes (M <= 32 rows), which CUDA graphs replay; at prefill sizes the dispatcher picks the unfused path (the same
work as Inductor's), and a prefill is launched from Python, where each coconut op costs more host time than
Inductor's own norm kernel and matmul (docs/performance.md). Dynamo keeps one cache entry per backend, so the two
compiled callables of one module never mix.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from nanovllm.config import Config
from nanovllm.engine.tuning_cache import use_tuning_file
from nanovllm.models.llama import head_dim_of
from nanovllm.utils.parallel import tp_rank

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, positions, rows) -> logits


def separate_prefill_compile(compile_fusion: bool, device_type: str) -> bool:
    """Whether prefill steps get their own Inductor-compiled model: with ``compile_fusion`` on CUDA. Elsewhere the
    one compiled (or eager) forward runs both."""
    return compile_fusion and device_type == "cuda"


@functools.lru_cache(maxsize=None)
def engine_coconut_backend() -> Callable:
    """The coconut backend as the engine uses it (one object per process: Dynamo's cache entries are per backend).

    Option ``coconut.launch`` = "op": the engine captures its decode steps in CUDA graphs of its own, which
    Inductor does not know about, so the backend's "auto" would take it for a graph launched from Python and write
    the batch-1 sites out as Inductor launches without PDL; replayed, the op's PDL launches are faster
    (fusion_pass/graph_launch.py).
    """
    import fusion_pass

    return fusion_pass.make_backend(options={"coconut.launch": "op"})


def compile_model(model: torch.nn.Module, backend: str | Callable) -> Forward:
    """``torch.compile`` of the model with ``backend`` (a name or a backend callable): one graph, dynamic token
    count."""
    # One graph serves every token count (dynamic=True); a batch of one token gets its own specialization.
    # Prefill and decode share the graph (attention is one opaque op), so few recompiles ever happen.
    cfg_dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(cfg_dynamo, name):
            setattr(cfg_dynamo, name, max(getattr(cfg_dynamo, name), 32))
    # Module guards stay on: Dynamo's cache belongs to the model class's forward, shared by every engine of the
    # process, and only those guards tell apart two models of different shapes.
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    if not hasattr(cfg_dynamo, "specialize_float"):
        return compiled

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # The model's float attributes (norm eps, RoPE and attention scales) are constants of the checkpoint. Under
        # dynamic=True Dynamo would first trace them as symbolic floats, then restart the whole trace to turn them
        # back into constants (torch/fx/passes/_tensorify_python_scalars.py): every graph traced twice. Specialized
        # here, for the engine's graphs only; the patch costs about 20 us of host time per call (prefill steps launched
        # from Python; replayed CUDA graphs never call this).
        with cfg_dynamo.patch(specialize_float=True):
            return compiled(input_ids, positions, rows)

    return forward


def build_forwards(model: torch.nn.Module, config: Config, device: torch.device) -> tuple[Forward, Forward]:
    """``(forward, prefill_forward)`` of the model (module docstring).

    GPU: ``enforce_eager=False`` compiles with Inductor, or with the ``coconut`` backend when ``compile_fusion``.
    CPU: only ``compile_fusion=True`` compiles (Inductor's CPU code gains little over eager for small models and
    costs compile time); otherwise the model runs eagerly.
    """
    if config.enforce_eager and not config.compile_fusion:
        return model, model
    if config.compile_fusion:
        forward = compile_model(model, engine_coconut_backend())
    elif device.type == "cuda":
        forward = compile_model(model, "inductor")
    else:
        return model, model
    if separate_prefill_compile(config.compile_fusion, device.type):
        return forward, compile_model(model, "inductor")
    return forward, forward


def fused_site_shapes(config: Config, world: int) -> list[int]:
    """Output sizes N of the model's three fused sites on one rank: qkv, gate_up and lm_head."""
    hf = config.hf_config
    head_dim = head_dim_of(hf)
    return [(hf.num_attention_heads + 2 * hf.num_key_value_heads) * head_dim // world,
            2 * hf.intermediate_size // world,
            -(-hf.vocab_size // world)]


def pretune_fusion(config: Config, dtype: torch.dtype, device: torch.device, world: int, rank: int,
                   batch_sizes: list[int]) -> None:
    """Time the fused op's candidates for the model's three sites (qkv, gate_up, lm_head) at the decode batch
    sizes, before the KV cache takes the memory the timing needs; larger prefill sizes are timed on first use.

    The decisions of this GPU in the engine's tuning file (``config.tuning_file``, resolved by
    :func:`nanovllm.engine.tuning_cache.use_tuning_file`) are loaded first and not measured again; the file is
    written (by rank 0) when something new was measured, and later on each first-use measurement.
    """
    import fusion_pass

    use_tuning_file(config.tuning_file, device, rank)
    largest = max(batch_sizes)
    sizes = sorted({1 << i for i in range(0, 14) if (1 << i) <= largest} | {largest})
    k = config.hf_config.hidden_size
    fusion_pass.pretune([(m, n, k) for n in fused_site_shapes(config, world) for m in sizes], dtype=dtype,
                        device=device)


def pretune_small_m(config: Config, dtype: torch.dtype, device: torch.device, world: int,
                    batch_sizes: list[int]) -> None:
    """Measure the engine's small-M linears (o_proj, and down_proj with its SwiGLU input) at the decode batch
    sizes on a GPU without a table of its own (nanovllm/kernels/gemv/dispatch.py), before the KV cache is sized;
    a GPU with a table has nothing to measure. The engine's tuning file is loaded first and written when
    something new was measured, as in :func:`pretune_fusion`."""
    from nanovllm.kernels.gemv import SKINNY_MAX_M
    from nanovllm.kernels.gemv.dispatch import pretune

    use_tuning_file(config.tuning_file, device, tp_rank())

    hf = config.hf_config
    head_dim = head_dim_of(hf)
    sites = [(hf.hidden_size, hf.num_attention_heads * head_dim // world, "none"),
             (hf.hidden_size, hf.intermediate_size // world, "silu_mul")]
    sizes = sorted({m for m in batch_sizes if m <= SKINNY_MAX_M})
    pretune([(m, n, k, act) for n, k, act in sites for m in sizes], dtype, device)
