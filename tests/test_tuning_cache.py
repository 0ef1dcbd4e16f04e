"""The on-disk tuning cache, on the CPU: a "GPU" exists for dispatch purposes only (its name, CUDA availability and
the measurement functions are faked), and the engine's pretune functions run against it.

The first build measures every shape and writes the file of its GPU once per pretune; a fresh start loads it and
measures nothing; another GPU measures again and never uses the first GPU's rows; a corrupt file is ignored with one
warning; an interrupted write leaves the previous file and no partial one; the ``tuning_file`` keyword is validated.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import fusion_pass
import fusion_pass.kernels as K
import nanovllm.kernels.gemv.dispatch as G
from fusion_pass import launch
from fusion_pass.kernels import dispatch as D
from fusion_pass.settings import configure_kernels
from nanovllm.config import Config
from nanovllm.engine import tuning_cache
from nanovllm.engine.compilation import fused_site_shapes, pretune_fusion, pretune_small_m

H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"  # neither has a small-M table: both measure it
SIZES = [1, 2, 4]


class FakeGpu:
    """What the dispatchers see of a GPU: its name, and the measurements (recorded, not run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.name = H100
        self.fused: list[tuple] = []
        self.small_m: list[tuple] = []
        self.saves = 0
        for module in (launch, D, G):
            monkeypatch.setattr(module, "device_name", lambda d: self.name if d.type == "cuda" else d.type)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        monkeypatch.setattr(D, "measure", self._measure_fused)
        monkeypatch.setattr(G, "measure", self._measure_small_m)
        save = D.save_tuning

        def counting_save(path: str) -> None:
            self.saves += 1
            save(path)

        monkeypatch.setattr(D, "save_tuning", counting_save)

    def _measure_fused(self, m: int, n: int, k: int, dtype: torch.dtype, device: Any,
                       widths: Any = None) -> K.Choice:
        self.fused.append((self.name, m, n, k))
        return K.Choice("stream", (4, 4, 4), "measured", (("stream[4,4,4]", 1.0),))

    def _measure_small_m(self, m: int, n: int, k: int, dtype: torch.dtype, device: Any, act: str) -> K.Choice:
        self.small_m.append((self.name, m, n, k, act))
        return K.Choice("skinny", (64, 256, 4, True), "measured")

    def start_engine(self, config: Config, rank: int = 0) -> tuple[int, int]:
        """An engine start's tuning: a fresh in-memory cache, then both pretunes; returns the new (fused, small-M)
        measurements."""
        K.clear_dispatch_cache()
        G.table_for.cache_clear()
        fused, small = len(self.fused), len(self.small_m)
        dev = torch.device("cuda")
        pretune_fusion(config, torch.bfloat16, dev, 1, rank, SIZES)
        pretune_small_m(config, torch.bfloat16, dev, 1, SIZES)
        return len(self.fused) - fused, len(self.small_m) - small


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeGpu]:
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))
    previous = configure_kernels()
    fake = FakeGpu(monkeypatch)
    try:
        yield fake
    finally:
        configure_kernels(**previous.as_dict())
        K.clear_dispatch_cache()
        G.table_for.cache_clear()


def rows_of(path: str) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def test_engine_tuning_cache_per_gpu(gpu: FakeGpu, tiny_ckpt: str) -> None:
    config = Config(tiny_ckpt, device="cpu")
    n_fused, n_small = 3 * len(SIZES), 2 * len(SIZES)  # qkv / gate_up / lm_head; o_proj / down_proj
    # first start: every shape measured, the GPU's default file written once per pretune
    assert gpu.start_engine(config) == (n_fused, n_small) and gpu.saves == 2
    h100_file = tuning_cache.default_tuning_path(H100)
    assert h100_file.startswith(str(Path(os.environ["NANOVLLM_CACHE"]) / "tuning" / "nvidia-h100-80gb-hbm3-torch"))
    assert f"-triton{__import__('triton').__version__}-" in h100_file
    rows = rows_of(h100_file)
    assert len(rows) == n_fused + n_small and {r["gpu"] for r in rows} == {H100}
    assert {r["versions"] for r in rows} == {K.versions_tag()}
    assert sorted(r["n"] for r in rows if r["op"] == K.OP) == sorted(fused_site_shapes(config, 1) * len(SIZES))
    # a restart loads the file: nothing measured, nothing written, every decision "loaded"
    assert gpu.start_engine(config) == (0, 0) and gpu.saves == 2
    table = K.dispatch_table()
    assert len(table) == n_fused + n_small and {v["source"] for v in table.values()} == {"loaded"}
    hf = config.hf_config
    o_proj = torch.zeros(hf.num_attention_heads * hf.head_dim, hf.hidden_size, dtype=torch.bfloat16)
    assert G.choose_path(_FakeCudaInput(2, hf.hidden_size), o_proj, None, "none") == \
        ("skinny", G.SkinnyConfig(64, 256, 4, True)) and len(gpu.small_m) == n_small  # served from the file
    # the coconut backend reads the engine's file through the kernel setting: its pretune measures nothing
    K.clear_dispatch_cache()
    configure_kernels(tuning_file=h100_file)
    k = config.hf_config.hidden_size
    fusion_pass.pretune([(m, n, k) for n in fused_site_shapes(config, 1) for m in SIZES], torch.bfloat16, "cuda")
    assert len(gpu.fused) == n_fused and gpu.saves == 2
    # another GPU: its own file, everything measured again, the H100's rows never used nor touched
    gpu.name = A100
    before = Path(h100_file).read_text()
    assert gpu.start_engine(config) == (n_fused, n_small) and gpu.saves == 4
    assert {key.split("/")[0] for key in K.dispatch_table()} == {A100}
    assert {r["gpu"] for r in rows_of(tuning_cache.default_tuning_path(A100))} == {A100}
    assert Path(h100_file).read_text() == before
    # rank 1 of a tensor-parallel engine loads but never writes; tuning_file=False: no file at all
    os.remove(tuning_cache.default_tuning_path(A100))
    K.clear_dispatch_cache()
    pretune_fusion(config, torch.bfloat16, torch.device("cuda"), 1, 1, SIZES)
    assert len(K.dispatch_table()) == n_fused and not os.path.exists(tuning_cache.default_tuning_path(A100))
    assert gpu.start_engine(Config(tiny_ckpt, device="cpu", tuning_file=False)) == (n_fused, n_small)
    assert os.listdir(Path(h100_file).parent) == [os.path.basename(h100_file)]


class _FakeCudaInput:  # the attributes choose_path reads of a CUDA tensor
    def __init__(self, m: int, k: int) -> None:
        self.is_cuda, self.shape, self.dtype, self.device = True, (m, k), torch.bfloat16, torch.device("cuda")


def test_corrupt_or_stale_tuning_file_is_ignored(gpu: FakeGpu, tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                 ) -> None:
    path = str(tmp_path / "t.json")
    Path(path).write_text('[{"gpu": "NVIDIA H100 80GB HBM3", "op": "rms_norm_linear", "m_bu')  # cut short
    configure_kernels(tuning_file=path)
    with caplog.at_level(logging.WARNING, logger="fusion_pass"):
        assert K.load_tuning_file(path) == 0 and K.load_tuning_file(path) == 0
        K.clear_dispatch_cache()
        fusion_pass.pretune([(1, 8, 16), (2, 8, 16)], torch.bfloat16, "cuda")
    assert sum(path in r.getMessage() for r in caplog.records) == 1  # one warning per file
    assert len(gpu.fused) == 2 and len(rows_of(path)) == 2  # measured, and the file replaced by a valid one
    for bad in ('{"rows": []}', '[["H100"]]', '[{"gpu": "x", "op": "o", "m_bucket": 1, "n": 2, "k": 3, '
                '"dtype": "bfloat16", "variant": "v", "config": "abc"}]'):
        Path(path).write_text(bad)
        with pytest.raises(ValueError):
            K.load_tuning(path)
    K.save_tuning(path)
    stale = [dict(r, versions="torch0.1-triton0.1-f0") for r in rows_of(path)]
    Path(path).write_text(json.dumps(stale))
    assert K.load_tuning(path) == 0  # rows of other versions are measured again


def test_interrupted_write_leaves_no_partial_file(gpu: FakeGpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    K.clear_dispatch_cache()
    fusion_pass.pretune([(1, 8, 16)], torch.bfloat16, "cuda")
    path = tmp_path / "t.json"
    K.save_tuning(str(path))
    good = path.read_text()
    fusion_pass.pretune([(2, 8, 16)], torch.bfloat16, "cuda")

    def dump_then_die(obj: Any, f: Any, **kw: Any) -> None:
        f.write(json.dumps(obj)[:20])
        raise KeyboardInterrupt

    monkeypatch.setattr(D.json, "dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        K.save_tuning(str(path))
    assert path.read_text() == good and os.listdir(tmp_path) == ["t.json"]


def test_first_use_reads_the_file_before_writing_it(gpu: FakeGpu, tmp_path: Path) -> None:
    """A first-use measurement (no pretune before it) loads the setting's file first: its rows are used, and kept
    when the new measurement is written."""
    path = tmp_path / "t.json"
    K.clear_dispatch_cache()
    fusion_pass.pretune([(1, 8, 16)], torch.bfloat16, "cuda")
    K.save_tuning(str(path))
    assert path.stat().st_mode & 0o777 == 0o644
    K.clear_dispatch_cache()
    configure_kernels(tuning_file=str(path))
    cuda = torch.device("cuda")
    assert K.choose(1, 8, 16, torch.bfloat16, cuda).source == "loaded" and len(gpu.fused) == 1
    assert K.choose(2, 8, 16, torch.bfloat16, cuda).source == "measured" and len(gpu.fused) == 2
    assert sorted(r["m_bucket"] for r in rows_of(str(path))) == [1, 2]


@pytest.mark.parametrize("value, err", [(True, TypeError), (3, TypeError), (" ", ValueError), ("", ValueError)])
def test_tuning_file_keyword_is_validated(tiny_ckpt: str, value: Any, err: type) -> None:
    with pytest.raises(err, match="tuning_file"):
        Config(tiny_ckpt, device="cpu", tuning_file=value)


def test_tuning_file_keyword_resolves(tiny_ckpt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(launch, "device_name", lambda d: "NVIDIA H200")
    cuda = torch.device("cuda")
    assert Config(tiny_ckpt, device="cpu", tuning_file=False).tuning_file is False
    assert tuning_cache.resolve_tuning_path(False, cuda) is None
    assert tuning_cache.resolve_tuning_path(None, torch.device("cpu")) is None
    assert tuning_cache.resolve_tuning_path(str(tmp_path / "x.json"), cuda) == str(tmp_path / "x.json")
    assert tuning_cache.resolve_tuning_path(None, cuda) == str(
        tmp_path / "tuning" / f"nvidia-h200-{K.versions_tag().lower()}.json")
