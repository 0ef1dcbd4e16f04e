"""Engine configuration: every keyword that ``LLM(model, **config)`` accepts, checked before any work starts."""
from __future__ import annotations

import difflib
import json
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.models.registry import check_model_config
from nanovllm.utils.loader import check_tokenizer_files

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Measured on the H200 (benchmarks/kernels.py --what attention-full, docs/attention.md "Block size"): decode attention with
# 16-token blocks is within 1 % of the best of 16..256 at batch >= 128 and within 7 % at every batch/context measured
# (64-256 are 6-9 % slower at batch >= 128), and 16 keeps prefix-cache hits fine-grained.
DEFAULT_BLOCK_SIZE = 16
MAX_SCHEDULER_STEPS = 64  # the largest num_scheduler_steps accepted (the runner sizes its buffers to the value given)
# num_scheduler_steps when not given, on one GPU. Measured on the H200 (benchmarks/latency.py and
# throughput.py): 8 steps per round against 1 took the decode step from 1.35 to 1.23 ms at batch 1 and from
# 7.04 to 6.27 ms at batch 256, and nano-vLLM's workload from 18,456 to 20,734-21,051 output tokens/s.
GPU_DEFAULT_SCHEDULER_STEPS = 8
# prefill_cuda_graph_max_tokens when not given, on one CUDA GPU (buckets 16 .. 2048 tokens: 8 graphs). Measured on an
# H200 (benchmarks/results/h200/latency-prefill-graphs.json): the batch-1 TTFT of a 512-token prompt fell from
# 30.3 to 2.6 ms with fusion (30.4 to 2.8 ms without), for 6.7 s (0.25 s) more capture at start.
GPU_DEFAULT_PREFILL_GRAPH_TOKENS = 2048
# torch.Generator.manual_seed accepts [-2^63, 2^64 - 1] (a negative seed is mapped to 2^64 + seed) and raises
# RuntimeError outside it
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


def check_seed(value: Any, name: str) -> int | None:
    """A seed setting as a Python int (None stays None).

    Raises:
        TypeError: ``value`` is not an integer (a bool included); the message names ``name``.
        ValueError: ``value`` is outside ``[SEED_MIN, SEED_MAX]``, torch.Generator.manual_seed's range.
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if not SEED_MIN <= value <= SEED_MAX:
        raise ValueError(f"{name} must be in [{SEED_MIN}, {SEED_MAX}] (torch.Generator.manual_seed's range), "
                         f"got {int(value)}")
    return int(value)


def default_num_scheduler_steps(device: str, tensor_parallel_size: int) -> int:
    """``num_scheduler_steps`` when the caller gives None: :data:`GPU_DEFAULT_SCHEDULER_STEPS` on one CUDA GPU;
    1 on the CPU (no host/GPU overlap to gain: the CPU computes the step itself) and under tensor parallelism
    (the workers follow single steps)."""
    return GPU_DEFAULT_SCHEDULER_STEPS if device == "cuda" and tensor_parallel_size == 1 else 1


def default_prefill_graph_tokens(device: str, tensor_parallel_size: int, enforce_eager: bool) -> int:
    """``prefill_cuda_graph_max_tokens`` when the caller gives None: :data:`GPU_DEFAULT_PREFILL_GRAPH_TOKENS` on one
    CUDA GPU without ``enforce_eager``; 0 (off) elsewhere (on the CPU there is no launch overhead to save)."""
    on = device == "cuda" and tensor_parallel_size == 1 and not enforce_eager
    return GPU_DEFAULT_PREFILL_GRAPH_TOKENS if on else 0


def _as_id_list(value: Any) -> list[int]:
    """An ``eos_token_id`` entry of config.json / generation_config.json (None, an int or a list) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@dataclass
class Config:
    """Engine settings. Field names and defaults follow vLLM's ``LLM`` keywords.

    Args:
        model: a folder holding a Hugging Face checkpoint of a supported architecture (models/registry.py: Llama,
            Mistral, Qwen2, Qwen3) with config.json, tokenizer files and *.safetensors.
        device: "cuda" or "cpu"; defaults to "cuda" when a GPU is present.
        dtype: "auto" (the checkpoint's dtype on CUDA, float32 on the CPU), "bfloat16", "float16" or "float32".
        max_num_batched_tokens: the most tokens one step processes (prefill chunks are cut to fit).
        max_num_seqs: the most sequences one step processes.
        max_model_len: the most tokens (prompt + output) of one sequence; capped by the checkpoint's
            ``max_position_embeddings``.
        gpu_memory_utilization: the fraction of the GPU's memory the engine may use (weights, activations and
            the KV cache together), in (0, 1].
        tensor_parallel_size: the number of processes (GPUs) the model is split across.
        enforce_eager: True runs the model without CUDA graphs, and without torch.compile unless
            ``compile_fusion`` asks for it.
        kvcache_block_size: tokens per KV block, a power of two.
        num_kvcache_blocks: -1 sizes the KV cache from memory; a positive value is used as given.
        compile_fusion: compile the model with the ``coconut`` backend (RMSNorm -> Linear fusion).
        seed: seed of the sampler's random generator (None: nondeterministic sampling), an int in
            ``[-2**63, 2**64 - 1]`` (``torch.Generator.manual_seed``'s range).
        num_scheduler_steps: the most decode steps run back to back per scheduling round (multi-step decode,
            vLLM's keyword of the same name), in [1, 64]. With k > 1, a round runs up to k steps (fewer when no
            running sequence may produce that many tokens, near max_model_len, or when free KV blocks are short:
            see ``Scheduler.extend_decode``); every sequence gets the blocks for ``len + k - 1`` tokens, the
            runner chains the steps on the device (each step's sampled tokens are the next step's input ids,
            without a round trip to the host) and the host reads all the tokens once. So the host's work
            (scheduling, batch preparation, stop checks) happens once per round instead of once per step; only
            the launches of the later steps run while the GPU works. A sequence that stops inside a round (EOS,
            max_tokens) drops the round's remaining tokens, and a waiting request is admitted at a round's
            end, so up to k - 1 steps later. Greedy outputs are the same for every value. 1 = one step per
            round. None (the default): 8 on one GPU, 1 on the CPU and with tensor parallelism
            (:func:`default_num_scheduler_steps`); tensor parallelism always runs 1.
        async_scheduling: with multi-step decode (``num_scheduler_steps`` > 1), plan and launch the next decode
            round while the device runs the current one, before its tokens are read
            (``Scheduler.plan_next_round``), so that scheduling, batch preparation and the stop checks of a round
            overlap the device's work instead of leaving it idle between rounds. The next round is planned only
            when it continues the current one (no waiting request that could be admitted, no preemption needed);
            a request that arrives meanwhile is admitted one round later. Sequences that reach
            max_tokens or max_model_len inside the current round are left out of it, and the tokens computed
            for a sequence that stops on a stop token in the current round are dropped. Outputs are the same as
            with False: greedy tokens exactly (on the GPU in bf16, up to the rounding of kernels chosen per batch
            size, which a stopped row kept in a round can change) and requests with their own
            ``SamplingParams.seed``; unseeded sampling under the engine's ``seed`` draws its noise in another order
            when rounds differ. Default True; False waits for each round's tokens before scheduling the next.
        tuning_file: the JSON file of the dispatch decisions measured on CUDA (the fused op's and the small-M
            linear's, ``fusion_pass.save_tuning`` format): decisions of this GPU found there are loaded instead of
            measured when the engine starts, and the file is written when something new was measured. None (the
            default): ``<cache folder>/tuning/<gpu>-torch<version>-triton<version>-f<format>.json`` in
            ``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm`` (nanovllm/engine/tuning_cache.py); a path: that file;
            False: no file (every start measures again).
        tp_timeout_s: seconds a tensor-parallel collective may wait for a peer before failing (> 0).
        tp_start_timeout_s: seconds each phase of the tensor-parallel start-up (load, KV sizing, compile, graph
            capture) may take before the start fails (> 0).
        prefill_cuda_graph_max_tokens: the largest prefill step (in tokens) that replays a CUDA graph instead of
            launching its kernels from Python; graphs are captured at start for buckets of 16, 32, 64, ... tokens
            up to ``min(this, max_num_batched_tokens)`` (that limit itself is the last bucket), each for up to
            ``min(max_num_seqs, 8)`` sequences; a step is padded to its bucket (engine/prefill_graphs.py). 0 turns
            them off; None (the default): :data:`GPU_DEFAULT_PREFILL_GRAPH_TOKENS` (2048, 8 graphs) on one CUDA GPU,
            0 elsewhere (:func:`default_prefill_graph_tokens`); ``enforce_eager`` and tensor parallelism run
            without them.

    Derived (not keywords): ``hf_config``; ``eos_token_ids``, every id that ends a request (unless
    ``ignore_eos``): the union of ``eos_token_id`` in config.json and in generation_config.json, each an int
    or a list; ``eos_token_id``, the first of them (-1 when there is none).

    Integer fields accept any integral number (numpy integers included) and are stored as Python ints.

    Raises:
        TypeError: an unknown keyword (named, with the closest known one) or a field of the wrong type.
        ValueError: a field out of range, or a checkpoint folder that does not exist.
    """

    model: str
    device: str | None = None
    dtype: str = "auto"
    max_num_batched_tokens: int = 16384
    max_num_seqs: int = 512
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kvcache_block_size: int = DEFAULT_BLOCK_SIZE
    num_kvcache_blocks: int = -1
    compile_fusion: bool = False
    seed: int | None = None
    num_scheduler_steps: int | None = None
    async_scheduling: bool = True
    tuning_file: str | bool | None = None
    tp_timeout_s: float = 600.0
    tp_start_timeout_s: float = 900.0
    prefill_cuda_graph_max_tokens: int | None = None
    hf_config: PretrainedConfig | None = field(default=None, repr=False)
    eos_token_id: int = -1  # the first EOS id (-1: none); every id that ends a request is in eos_token_ids
    eos_token_ids: frozenset[int] = frozenset()

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "Config":
        """Build a Config from ``LLM``'s keywords; an unknown keyword raises TypeError naming it."""
        known = {f.name for f in fields(cls)} - {"model", "hf_config", "eos_token_id", "eos_token_ids"}
        for key in kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"LLM() got an unknown keyword argument {key!r}{hint}")
        return cls(model=model, **kwargs)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(f"model must be a path to a checkpoint folder, got {self.model!r}")
        self.model = os.fspath(self.model)
        if not os.path.isdir(self.model):
            what = "is a file, not a folder" if os.path.exists(self.model) else "does not exist"
            raise ValueError(f"model: checkpoint folder {self.model!r} {what}")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ValueError(f"model: {self.model!r} holds no config.json (not a Hugging Face checkpoint folder)")
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "tensor_parallel_size",
                     "kvcache_block_size", "num_kvcache_blocks", "num_scheduler_steps",
                     "prefill_cuda_graph_max_tokens"):
            value = getattr(self, name)
            if value is None and name in ("num_scheduler_steps", "prefill_cuda_graph_max_tokens"):
                continue  # resolved below, once the device is known
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r}")
            setattr(self, name, int(value))  # numpy integers become Python ints
        for name in ("enforce_eager", "compile_fusion", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.gpu_memory_utilization, (bool, np.bool_)) or not isinstance(self.gpu_memory_utilization,
                                                                                          numbers.Real):
            raise TypeError(f"gpu_memory_utilization must be a number, got {self.gpu_memory_utilization!r}")
        self.gpu_memory_utilization = float(self.gpu_memory_utilization)
        self.seed = check_seed(self.seed, "seed")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is available")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto', 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0.0 < float(self.gpu_memory_utilization) <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_scheduler_steps is None:
            self.num_scheduler_steps = default_num_scheduler_steps(self.device, self.tensor_parallel_size)
        if self.prefill_cuda_graph_max_tokens is None:
            self.prefill_cuda_graph_max_tokens = default_prefill_graph_tokens(
                self.device, self.tensor_parallel_size, self.enforce_eager)
        if not 1 <= self.num_scheduler_steps <= MAX_SCHEDULER_STEPS:
            raise ValueError(f"num_scheduler_steps must be in [1, {MAX_SCHEDULER_STEPS}], got {self.num_scheduler_steps}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.device == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} but only "
                             f"{torch.cuda.device_count()} GPU(s) are visible")
        bs = self.kvcache_block_size
        if bs < 1 or bs & (bs - 1):
            raise ValueError(f"kvcache_block_size must be a power of two, got {bs}")
        if self.prefill_cuda_graph_max_tokens < 0:
            raise ValueError(f"prefill_cuda_graph_max_tokens must be >= 0 (0: off), got "
                             f"{self.prefill_cuda_graph_max_tokens}")
        if self.num_kvcache_blocks == 0 or self.num_kvcache_blocks < -1:
            raise ValueError(f"num_kvcache_blocks must be -1 (size from memory) or positive, got {self.num_kvcache_blocks}")
        self._check_runtime_keywords()
        self.hf_config = AutoConfig.from_pretrained(self.model)
        hf = self.hf_config
        check_model_config(hf, min(self.max_model_len, hf.max_position_embeddings))  # architecture, RoPE, window
        check_tokenizer_files(self.model)
        for name in ("num_attention_heads", "num_key_value_heads"):
            if getattr(hf, name) % self.tensor_parallel_size:
                raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} does not divide {name}={getattr(hf, name)}")
        self.max_model_len = min(self.max_model_len, hf.max_position_embeddings)
        ids = _as_id_list(getattr(hf, "eos_token_id", None))
        gen_path = os.path.join(self.model, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path) as f:
                ids += [i for i in _as_id_list(json.load(f).get("eos_token_id")) if i not in ids]
        self.eos_token_id = ids[0] if ids else -1
        self.eos_token_ids = frozenset(ids)

    def _check_runtime_keywords(self) -> None:
        """Validate ``tuning_file``, ``tp_timeout_s`` and ``tp_start_timeout_s`` (TypeError / ValueError)."""
        if self.tuning_file is not None and self.tuning_file is not False:
            if not isinstance(self.tuning_file, (str, os.PathLike)):
                raise TypeError("tuning_file must be a path, None (the default file in the cache folder) or False "
                                f"(no file), got {self.tuning_file!r}")
            self.tuning_file = os.fspath(self.tuning_file)
            if not self.tuning_file.strip():
                raise ValueError("tuning_file must not be empty (None: the default file, False: no file)")
        for name in ("tp_timeout_s", "tp_start_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number of seconds, got {value!r}")
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of weights, activations and KV cache."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.device == "cpu":
            return torch.float32
        ckpt = getattr(self.hf_config, "torch_dtype", None) or getattr(self.hf_config, "dtype", None)
        if isinstance(ckpt, str):
            ckpt = getattr(torch, ckpt)
        return ckpt if ckpt in _DTYPES.values() else torch.bfloat16
