"""Issue 17, acceptance 4: checkpoints that do not match their config, or that this engine cannot run, are refused
with a ValueError that names the problem, before any generation."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanovllm import LLM

KW = dict(device="cpu", kvcache_block_size=16, max_model_len=256)


@pytest.fixture
def ckpt(tiny_ckpt: str, tmp_path) -> str:  # noqa: ANN001
    """A private copy of the tiny Qwen3 checkpoint that a test may break."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(tiny_ckpt, path)
    return path


def _edit_config(path: str, **fields: object) -> None:
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(fields)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _edit_tensors(path: str, edit) -> None:  # noqa: ANN001 - edit(dict[str, Tensor]) -> None
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_unknown_architecture_is_named_with_the_supported_ones(ckpt: str) -> None:
    _edit_config(ckpt, architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match=r"architecture GPTNeoXForCausalLM is not supported \(supported: "
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM\)"):
        LLM(ckpt, **KW)


def test_unsupported_rope_scaling_is_named(ckpt: str) -> None:
    _edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 512})
    with pytest.raises(ValueError, match=r"rope_scaling type 'yarn' is not supported \(supported: default, linear, "
                                         r"llama3\)"):
        LLM(ckpt, **KW)


def test_mistral_sliding_window_shorter_than_max_model_len(tmp_path) -> None:  # noqa: ANN001
    from test_models_families import make_family_checkpoint

    path = make_family_checkpoint(str(tmp_path / "mistral"), "mistral", sliding_window=128)
    with pytest.raises(ValueError, match=r"sliding-window attention is not supported \(sliding_window=128 < "
                                         r"max_model_len=256\)"):
        LLM(path, **KW)
    llm = LLM(path, **{**KW, "max_model_len": 128})  # the window never takes effect: accepted
    assert llm.config.max_model_len == 128


@pytest.mark.parametrize("name, shape, implied", [
    ("model.embed_tokens.weight", (1000, 64), (1024, 64)),  # vocabulary
    ("model.norm.weight", (48,), (64,)),  # hidden size
    ("model.layers.1.self_attn.k_norm.weight", (8,), (16,)),  # head_dim
    ("model.layers.0.self_attn.q_proj.weight", (64, 64), (64, 64)),  # head_dim 16 x 4 heads: this one fits
])
def test_tensor_shape_disagreeing_with_config(ckpt: str, name: str, shape: tuple[int, ...],
                                               implied: tuple[int, ...]) -> None:
    _edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.zeros(shape)))
    if shape == implied:
        LLM(ckpt, **KW).shutdown()
        return
    with pytest.raises(ValueError, match=rf"tensor '{name}' has shape {list(shape)} in the file but the config "
                                         rf"implies {list(implied)}".replace("[", r"\[").replace("]", r"\]")):
        LLM(ckpt, **KW)


def test_missing_and_unexpected_tensors(ckpt: str) -> None:
    def edit(t: dict) -> None:
        del t["model.layers.1.mlp.down_proj.weight"]
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    _edit_tensors(ckpt, edit)
    with pytest.raises(ValueError) as err:
        LLM(ckpt, **KW)
    msg = str(err.value)
    assert "tensor 'model.layers.1.mlp.down_proj.weight' is missing (the config implies shape [64, 128])" in msg
    assert "tensor 'model.layers.0.self_attn.q_proj.bias' (shape [64]) is not part of this architecture" in msg


def test_missing_tokenizer(ckpt: str) -> None:
    for f in os.listdir(ckpt):
        if f.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            os.remove(os.path.join(ckpt, f))
    with pytest.raises(ValueError, match=r"no tokenizer files in .*expected one of tokenizer.json"):
        LLM(ckpt, **KW)


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors"])
def test_unreadable_safetensors_file_is_named(ckpt: str, damage: str) -> None:
    file = os.path.join(ckpt, "model.safetensors")
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model: '.*model\.safetensors' is not a readable safetensors file"):
        LLM(ckpt, **KW)


def test_a_file_given_as_the_checkpoint_folder_is_named(ckpt: str) -> None:
    with pytest.raises(ValueError, match=r"config\.json' is a file, not a folder"):
        LLM(os.path.join(ckpt, "config.json"), **KW)
