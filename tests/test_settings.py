"""The settings that replaced environment variables: the LLM keywords tuning_file / tp_timeout_s /
tp_start_timeout_s and the kernels' settings (fusion_pass.settings) are validated; the package reads at most the
documented environment variables."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fusion_pass.settings import FORCED_VARIANTS, configure_kernels, kernel_settings
from nanovllm.config import Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kw, err, match", [
    (dict(tuning_file=3), TypeError, "tuning_file"),
    (dict(tuning_file=" "), ValueError, "tuning_file"),
    (dict(tp_timeout_s="10"), TypeError, "tp_timeout_s"),
    (dict(tp_timeout_s=True), TypeError, "tp_timeout_s"),
    (dict(tp_timeout_s=0), ValueError, "tp_timeout_s"),
    (dict(tp_start_timeout_s=-1.5), ValueError, "tp_start_timeout_s"),
    (dict(tp_start_timeout_s=None), TypeError, "tp_start_timeout_s"),
])
def test_bad_keyword_values_raise(tiny_ckpt: str, kw: dict, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        Config(tiny_ckpt, device="cpu", **kw)


def test_good_keyword_values(tiny_ckpt: str, tmp_path: Path) -> None:
    cfg = Config(tiny_ckpt, device="cpu", tuning_file=tmp_path / "t.json", tp_timeout_s=5, tp_start_timeout_s=7.5)
    assert (cfg.tuning_file, cfg.tp_timeout_s, cfg.tp_start_timeout_s) == (str(tmp_path / "t.json"), 5, 7.5)


def test_kernel_settings_validate_and_restore() -> None:
    before = kernel_settings()
    assert before.variant in FORCED_VARIANTS
    for kw, err in ((dict(pdl="yes"), TypeError), (dict(autotune=0), TypeError), (dict(poison_outputs=None), TypeError),
                    (dict(variant="gemv"), ValueError), (dict(tuning_file=""), ValueError), (dict(nope=1), TypeError)):
        with pytest.raises(err):
            configure_kernels(**kw)
        assert kernel_settings() == before  # a refused change changes nothing
    previous = configure_kernels(pdl=not before.pdl, variant="unfused")
    try:
        assert previous == before and kernel_settings().pdl is (not before.pdl)
        assert kernel_settings().variant == "unfused"
    finally:
        configure_kernels(**previous.as_dict())
    assert kernel_settings() == before


def test_package_reads_only_the_documented_environment_variables() -> None:
    """At most 5 distinct NANOVLLM_* / COCONUT_* names in nanovllm/ and fusion_pass/, and every one that is read from
    the environment is in docs/configuration.md's table."""
    names: set[str] = set()
    read: set[str] = set()
    for pkg in ("nanovllm", "fusion_pass"):
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            names |= set(re.findall(r"\b(?:NANOVLLM|COCONUT)_[A-Z0-9_]+", text))
            read |= set(re.findall(r"(?:environ(?:\.get)?|getenv)\(?\[?\s*[\"']((?:NANOVLLM|COCONUT)_[A-Z0-9_]+)", text))
    assert len(names) <= 5, sorted(names)
    assert read, "the package reads NANOVLLM_CACHE at least"
    doc = (ROOT / "docs" / "configuration.md").read_text()
    table = {m for m in re.findall(r"^\| `((?:NANOVLLM|COCONUT)_[A-Z0-9_]+)`", doc, re.M)}
    assert read <= table, sorted(read - table)
