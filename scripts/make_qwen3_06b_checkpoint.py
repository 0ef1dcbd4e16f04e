"""Write a random-weight Hugging Face checkpoint with Qwen3-0.6B's (or, ``--shape llama-3.2-1b``, Llama-3.2-1B's)
exact configuration.

The benchmarks need a model of Qwen3-0.6B's shapes (the model nano-vLLM's benchmark uses), but the GPU machine
cannot download anything, so this script builds one: a ``Qwen3ForCausalLM`` with the published Qwen3-0.6B
config (hidden 1024, 28 layers, 16 query heads, 8 KV heads, head_dim 128, intermediate 3072, vocab 151936,
tied embeddings) and random weights, plus a small byte-level BPE tokenizer so that ``AutoTokenizer`` loads.

Weights: every linear / embedding matrix is drawn from N(0, std^2) (std 0.02, transformers'
``initializer_range`` default, so activations stay O(1) and sampled outputs are not degenerate); every RMSNorm
weight is drawn from N(1, 0.1^2) (not exactly 1, so a fused kernel that drops it is caught). The model is
built on the ``meta`` device (no init cost) and then materialised directly in the target dtype, so the whole
script takes seconds: the random numbers are drawn on the GPU when there is one (well under a second), else
about 1 s per 100 M values per CPU core (~7 s of RNG for 0.6 B values on 2 idle cores), plus ~3 s to save.

Usage::

    python scripts/make_qwen3_06b_checkpoint.py --out /tmp/qwen3-0.6b
    python scripts/make_qwen3_06b_checkpoint.py --out /tmp/qwen3-0.6b-sharded --shard-size 300MB
    python scripts/make_qwen3_06b_checkpoint.py --out /tmp/q3-2l --num-layers 2     # small, for tests
    python scripts/make_qwen3_06b_checkpoint.py --out /tmp/llama-1b --shape llama-3.2-1b

``--shape llama-3.2-1b`` writes a ``LlamaForCausalLM`` with Llama-3.2-1B's published config (hidden 2048,
16 layers, 32 query heads, 8 KV heads, head_dim 64, intermediate 8192, vocab 128256, tied embeddings, RoPE theta
500000 with llama3 scaling: factor 32, low/high frequency factors 1 and 4, original 8192 positions).

Output files: config.json, generation_config.json, model.safetensors (or model-0000x-of-0000y.safetensors +
model.safetensors.index.json with --shard-size), and the tokenizer files (tokenizer.json,
tokenizer_config.json, ...). The tokenizer is tiny (its ids are all < 151936); the token ids of the real
Qwen3 special tokens (bos 151643, eos 151645) are kept in config.json / generation_config.json, but the
tokenizer's own ``<|im_end|>`` has a small id, so EOS by text does not match EOS by id. The benchmarks use
random token ids and ``ignore_eos=True``, so this does not matter to them.
"""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import shutil
import sys
import tempfile
import time

import torch

# Running as ``python scripts/make_qwen3_06b_checkpoint.py`` puts scripts/ on sys.path, not the repository root:
# add it so that ``nanovllm`` (for its tokenizer builder) is importable without installing the package.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# Qwen3-0.6B's published config.json (the values that shape the model).
QWEN3_06B: dict[str, object] = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    attention_bias=False,
    bos_token_id=151643,
    eos_token_id=151645,
    initializer_range=0.02,
    use_sliding_window=False,
    max_window_layers=28,
)

# Llama-3.2-1B's published config.json (the values that shape the model).
LLAMA_32_1B: dict[str, object] = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=128000,
    eos_token_id=128001,
    initializer_range=0.02,
)

SHAPES: dict[str, tuple[str, dict[str, object]]] = {  # --shape -> (transformers class prefix, config)
    "qwen3-0.6b": ("Qwen3", QWEN3_06B),
    "llama-3.2-1b": ("Llama", LLAMA_32_1B),
}

SPECIAL_TOKENS: list[str] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Text used to train the fallback tokenizer (any text works: the benchmarks feed token ids).
_CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "A paged KV cache stores keys and values in fixed-size blocks, addressed through a block table.",
    "Prefill processes the whole prompt at once; decode produces one token per sequence per step.",
    "RMSNorm scales each row by the reciprocal root mean square of its entries, then by a learned weight.",
    "def forward(self, x: torch.Tensor) -> torch.Tensor:\n    return self.linear(self.norm(x))\n",
    "Large language models generate text one token at a time, sampling from a softmax over the vocabulary.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" # $ % & @ ^ _ ` | ~",
    "Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.",
    "<|im_start|>user\nIntroduce yourself.<|im_end|>\n<|im_start|>assistant\n",
]


def build_model(cfg_kwargs: dict[str, object], dtype: torch.dtype, seed: int, device: str, std: float,
                norm_std: float = 0.1, family: str = "Qwen3"):
    """Build a ``<family>ForCausalLM`` with random weights, directly in ``dtype`` on ``device``.

    Args:
        cfg_kwargs: ``<family>Config`` keyword arguments (``QWEN3_06B`` or ``LLAMA_32_1B`` plus overrides).
        dtype: parameter dtype.
        seed: seed of the ``torch.Generator`` used for every weight (results differ between CPU and CUDA).
        device: "cpu" or "cuda" (where the random numbers are drawn).
        std: standard deviation of the linear / embedding weights.
        norm_std: RMSNorm weights are drawn from N(1, norm_std^2) (not all ones, so that a kernel that
            forgets the norm weight gives visibly different outputs; 0 gives exact ones).

    Returns:
        (model, config): the model (parameters on ``device``, eval mode) and its config.
        family: "Qwen3" or "Llama" (the transformers class prefix).
    """
    import transformers

    config = getattr(transformers, f"{family}Config")(**cfg_kwargs)
    config.dtype = dtype  # transformers >= 4.56 name; serialised as "dtype" in config.json
    old_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = getattr(transformers, f"{family}ForCausalLM")(config)
    finally:
        torch.set_default_dtype(old_default)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        seen: set[int] = set()
        for name, p in model.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() == 1:  # RMSNorm weights (input/post-attention/final norms, q_norm, k_norm)
                p.normal_(1.0, norm_std, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
        # to_empty() leaves non-persistent buffers (rotary inv_freq) uninitialised; they are not saved, but
        # rebuild them so that the in-memory model is usable too.
        for mod in model.modules():
            if type(mod).__name__.endswith("RotaryEmbedding"):
                fresh = type(mod)(config=config)  # float32 default dtype here, CPU
                for bname, buf in fresh.named_buffers(recurse=False):
                    getattr(mod, bname).copy_(buf)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model, config


def _train_bpe_tokenizer(out_dir: str, vocab_size: int = 1024) -> None:
    """Train a small byte-level BPE tokenizer on ``_CORPUS`` and save it as a ``PreTrainedTokenizerFast``.

    Special tokens ``<|endoftext|>`` (bos/pad), ``<|im_start|>``, ``<|im_end|>`` (eos) get ids 0, 1, 2;
    every id is < ``vocab_size`` (<= a few hundred merges are learnt from the small corpus).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(out_dir)


def _tokenizer_from_engine(out_dir: str) -> bool:
    """Save the tokenizer of ``nanovllm.utils.tiny_model`` (the engine's own test tokenizer) into ``out_dir``.

    Uses ``tiny_model.train_tokenizer()`` when it exists; otherwise calls ``build_tiny_checkpoint`` into a
    temporary folder and copies every file that is not weights or model config. Returns False (having written
    nothing) when the engine is not importable or both fail.
    """
    try:
        from nanovllm.utils import tiny_model  # type: ignore[import-not-found]
    except Exception as e:  # noqa: BLE001 - any import problem means "use the fallback"
        print(f"[tokenizer] nanovllm.utils.tiny_model not usable ({type(e).__name__}: {e}); training my own BPE")
        return False
    train = getattr(tiny_model, "train_tokenizer", None)
    if callable(train):
        try:
            train().save_pretrained(out_dir)
            print("[tokenizer] nanovllm.utils.tiny_model.train_tokenizer()")
            return True
        except Exception as e:  # noqa: BLE001
            print(f"[tokenizer] tiny_model.train_tokenizer failed ({type(e).__name__}: {e})")
    build = getattr(tiny_model, "build_tiny_checkpoint", None)
    if not callable(build):
        return False
    skip = {"config.json", "generation_config.json", "model.safetensors.index.json", "nanovllm_stamp.json"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            build(tmp)
        except Exception as e:  # noqa: BLE001
            print(f"[tokenizer] build_tiny_checkpoint failed ({type(e).__name__}: {e}); training my own BPE")
            return False
        files = [f for f in os.listdir(tmp) if f not in skip and not f.endswith((".safetensors", ".bin", ".pt"))
                 and os.path.isfile(os.path.join(tmp, f))]
        if not any(f.startswith("tokenizer") for f in files):
            print("[tokenizer] build_tiny_checkpoint wrote no tokenizer files; training my own BPE")
            return False
        for f in files:
            shutil.copy(os.path.join(tmp, f), os.path.join(out_dir, f))
    print(f"[tokenizer] copied from nanovllm.utils.tiny_model.build_tiny_checkpoint: {sorted(files)}")
    return True


def write_tokenizer(out_dir: str, vocab_size: int, source: str = "auto") -> str:
    """Write tokenizer files into ``out_dir`` and check that every token id is < ``vocab_size``.

    Args:
        out_dir: checkpoint folder.
        vocab_size: the model's vocabulary size (token ids must stay below it).
        source: "auto" (the engine's tiny-model tokenizer if importable, else train one), "engine", or "train".

    Returns:
        "engine" or "train": where the tokenizer came from.

    Raises:
        RuntimeError: the tokenizer has an id >= vocab_size, or source="engine" and the engine's builder failed.
    """
    used = None
    if source in ("auto", "engine") and _tokenizer_from_engine(out_dir):
        used = "engine"
    elif source == "engine":
        raise RuntimeError("--tokenizer engine: nanovllm.utils.tiny_model.build_tiny_checkpoint is not usable")
    if used is None:
        _train_bpe_tokenizer(out_dir)
        used = "train"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    max_id = max(tok.get_vocab().values())
    if max_id >= vocab_size:
        raise RuntimeError(f"tokenizer has token id {max_id} >= vocab_size {vocab_size}")
    ids = tok.encode("Hello, world!")
    print(f"[tokenizer] {type(tok).__name__}: {len(tok)} tokens (max id {max_id}), eos={tok.eos_token!r} "
          f"(id {tok.eos_token_id}); 'Hello, world!' -> {ids}")
    return used


def _save(model, out_dir: str, shard_size: str | None) -> None:
    """``save_pretrained`` as safetensors, sharded when ``shard_size`` is given (works on transformers 4.5x-5.x)."""
    kwargs: dict[str, object] = {}
    params = inspect.signature(model.save_pretrained).parameters
    if "safe_serialization" in params:  # transformers 4.x (5.x always writes safetensors)
        kwargs["safe_serialization"] = True
    if shard_size:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(out_dir, **kwargs)


def _patch_config_json(out_dir: str, rope_theta: float) -> None:
    """Add the top-level ``rope_theta`` that Qwen3-0.6B's original config.json has.

    transformers 5 writes ``rope_parameters={'rope_theta': ..., 'rope_type': 'default'}`` instead; loaders
    written against either convention then find the value. Harmless to transformers' own loading.
    """
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        d = json.load(f)
    d.setdefault("rope_theta", rope_theta)
    if d.get("dtype") is None and d.get("torch_dtype") is None:
        d["dtype"] = "bfloat16"
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created; existing model files are replaced)")
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES),
                    help="the published config to copy (default qwen3-0.6b)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02, help="std of the random linear/embedding weights")
    ap.add_argument("--norm-std", type=float, default=0.1, help="RMSNorm weights ~ N(1, norm_std^2)")
    ap.add_argument("--shard-size", default=None,
                    help="write a sharded checkpoint (model.safetensors.index.json), e.g. 300MB")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="override num_hidden_layers (tests only: the result is no longer Qwen3-0.6B-shaped)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where to draw the random weights (auto: cuda if available)")
    ap.add_argument("--tokenizer", default="auto", choices=["auto", "engine", "train"],
                    help="auto: nanovllm.utils.tiny_model's tokenizer if importable, else train a small byte-level "
                         "BPE here; engine / train: force one")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    family, shape = SHAPES[args.shape]
    cfg = dict(shape)
    if args.num_layers is not None:
        cfg["num_hidden_layers"] = args.num_layers
        if family == "Qwen3":
            cfg["max_window_layers"] = args.num_layers
    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "model*.safetensors*")):
        os.remove(old)  # a previous sharded / unsharded save must not be mixed with this one

    model, config = build_model(cfg, DTYPES[args.dtype], args.seed, device, args.std, args.norm_std, family)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() deduplicates the tied lm_head
    t_init = time.perf_counter() - t0
    _save(model, args.out, args.shard_size)
    del model
    _patch_config_json(args.out, float(cfg["rope_theta"]))
    tok_source = write_tokenizer(args.out, int(cfg["vocab_size"]), args.tokenizer)

    files = sorted(os.listdir(args.out))
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in files)
    print(f"wrote {args.out}: {n_params / 1e6:.1f} M parameters ({args.dtype}), {size / 1e9:.3f} GB, "
          f"{len(files)} files {files}; tokenizer: {tok_source}; init {t_init:.1f} s on {device}, "
          f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
