"""The benchmark scripts on the CPU with a tiny checkpoint: each writes the JSON keys its GPU record needs
(issue-defined keys of latency.json and throughput.json, the merged parts of kernels/profile/check), and the
harness's pure helpers compute what they say. Timings on the CPU mean nothing and are not checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import check, kernels, latency, plot, throughput  # noqa: E402
from benchmarks.harness import accelerator, engine, results_io, timing, workloads  # noqa: E402

HEADER = {"gpu", "date", "commit", "command", "versions"}
ENGINE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "64", "--max-num-batched-tokens", "128"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    from nanovllm.utils.tiny_model import build_tiny_checkpoint

    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-bench")))


@pytest.fixture(scope="module")
def latency_result(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("lat") / "latency.json"
    rc = latency.main(["--model", ckpt, *ENGINE_FLAGS, "--batches", "1,2", "--prompt-len", "8", "--max-tokens", "4",
                       "--pairs", "2", "--second-model", ckpt, "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_latency_keys(latency_result: dict) -> None:
    r = latency_result
    assert HEADER <= set(r) and r["command"].startswith("python benchmarks/latency.py --model ")
    for figures in (r, r["llama-3.2-1b"]):
        for key in ("batch1_decode_step_ms", "bandwidth_fraction", "batch1_ttft_ms"):
            assert set(figures[key]) == {"fusion", "nofusion"}
        assert figures["weights_bytes"] > 0 and figures["weights_floor_ms"] > 0
        assert [row["batch"] for row in figures["by_batch"]] == [1, 2]
        b1 = figures["by_batch"][0]
        for side in ("fusion", "nofusion"):
            assert len(b1[side]["decode_step_ms"]) == 2 and all(x > 0 for x in b1[side]["ttft_ms"])
            assert figures["batch1_decode_step_ms"][side] == b1[side]["decode_step_ms_median"]
            assert figures["bandwidth_fraction"][side] == pytest.approx(
                figures["weights_floor_ms"] / b1[side]["decode_step_ms_median"], abs=1e-4)
        ratios = [n / f for f, n in zip(b1["fusion"]["decode_step_ms"], b1["nofusion"]["decode_step_ms"])]
        assert b1["nofusion_over_fusion"]["median"] == pytest.approx(sum(ratios) / 2, rel=1e-4)
    assert r["copy_bandwidth_tb_s"] > 0
    assert r["engines"]["fusion"]["llm_kwargs"]["compile_fusion"] is True
    assert r["engines"]["fusion"]["llm_kwargs"]["gpu_memory_utilization"] == pytest.approx(0.45)


def test_latency_transformers_flag_without_module(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(latency, "hf_decode_module", lambda: None)
    with pytest.raises(SystemExit) as e:
        latency.parse_args(["--transformers"])
    assert e.value.code == 2 and "hf_decode.py" in capsys.readouterr().err


def test_latency_transformers_args_go_to_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_decode's own flags (which share names with latency.py's) are parsed from --transformers-args."""
    import argparse
    import types

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--batches", default="1,8")
        p.add_argument("--device", default="cuda")

    fake = types.SimpleNamespace(add_arguments=add_arguments)
    monkeypatch.setattr(latency, "hf_decode_module", lambda: fake)
    args = latency.parse_args(["--batches", "1,2", "--transformers", "--transformers-args", "--device cpu"])
    assert args.batches == [1, 2]
    assert (args.transformers_ns.batches, args.transformers_ns.device) == ("1,8", "cpu")


@pytest.mark.parametrize("flag, value", [("--max-tokens", "1"), ("--pairs", "0"), ("--batches", "0,2"),
                                         ("--gpu-memory-utilization", "1.5")])
def test_latency_bad_flags(flag: str, value: str) -> None:
    with pytest.raises(SystemExit):
        latency.parse_args([flag, value])


def test_throughput_keys(ckpt: str, tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--model", ckpt, *ENGINE_FLAGS,
           "--modes", "nofusion", "--num-seqs", "3", "--min-input-len", "8", "--max-input-len", "16",
           "--min-output-len", "3", "--max-output-len", "6", "--max-num-seqs", "4", "--peer", "--peer-num-seqs", "2",
           "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert HEADER <= set(r)
    for key in ("output_tokens_per_s", "cold_build_s", "warm_build_s", "first_run_over_second"):
        assert set(r[key]) == {"nofusion"} and r[key]["nofusion"] > 0, key
    assert r["copy_bandwidth_tb_s"] > 0 and r["floor_tokens_per_s"] > 0
    cold, warm = r["children"]["nofusion-cold"], r["children"]["nofusion-warm"]
    assert r["output_tokens_per_s"]["nofusion"] == warm["runs"][1]["output_tokens_per_s"]
    assert r["first_run_over_second"]["nofusion"] == pytest.approx(
        warm["runs"][0]["output_tokens_per_s"] / warm["runs"][1]["output_tokens_per_s"], rel=1e-3)
    assert cold["build_s"] == r["cold_build_s"]["nofusion"]
    for kind, child in (("cold", cold), ("warm", warm)):  # the engine's build phases (CPU: load and kv_cache)
        phases = r["build_phases_s"][kind]["nofusion"]
        assert phases == child["init_seconds"] and {"load", "kv_cache"} <= set(phases), (kind, phases)
        assert 0 <= sum(phases.values()) <= child["build_s"] + 0.05, (kind, phases)
    assert all(run["cached_tokens"] == 0 for run in warm["runs"])  # the second run reuses no prefix
    assert all(0 < run["host_s"] < run["prefill_s"] + run["decode_s"] for run in warm["runs"])
    assert r["transformers_peer"]["num_seqs"] == 2 and r["transformers_peer"]["output_tokens_per_s"] > 0
    assert r["workload"]["output_tokens"] == sum(
        workloads.nano_vllm_workload(3, 0, 16, 6, 8, 3)[1])
    # --into-key: a second checkpoint's figures under their own key; the file's own figures stay as they were
    second = [sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--model", ckpt, *ENGINE_FLAGS,
              "--modes", "nofusion", "--num-seqs", "2", "--min-input-len", "8", "--max-input-len", "16",
              "--min-output-len", "3", "--max-output-len", "6", "--max-num-seqs", "4", "--no-cold",
              "--into-key", "second", "--out", str(out)]
    p = subprocess.run(second, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r2 = json.loads(out.read_text())
    assert {k: v for k, v in r2.items() if k != "second"} == r
    assert HEADER <= set(r2["second"]) and r2["second"]["output_tokens_per_s"]["nofusion"] > 0
    assert r2["second"]["workload"]["num_seqs"] == 2 and set(r2["second"]["children"]) == {"nofusion-warm"}


def test_parts_scripts_merge_and_record_failures(ckpt: str, tmp_path) -> None:  # noqa: ANN001
    """kernels.py / check.py merge each part's JSON under ``parts`` with its exit status; on the CPU the GPU-only
    parts refuse (status 2) and the script reports failure, but the file is complete."""
    out = tmp_path / "kernels.json"
    assert kernels.main(["--what", "pdl-chain", "--out", str(out)]) == 1
    r = json.loads(out.read_text())
    assert HEADER <= set(r) and set(r["parts"]) == {"pdl-chain"} and r["parts"]["pdl-chain"]["rc"] != 0
    with pytest.raises(SystemExit):
        check.main(["--what", "nothing"])


def test_kernel_ops_through_public_entry_points(tmp_path) -> None:  # noqa: ANN001
    """kernels.py's default parts on the CPU (shapes scaled down 16x): every case has its error against float64,
    its floor and both timings, and the fused op's and the GEMV's outputs match float64."""
    out = tmp_path / "kernels.json"
    rc = kernels.main(["--what", "fusion,gemv,attention", "--part-args",
                       "fusion=--device cpu --dtype float32 --scale 16 --ms 1,3 --sites qkv --pairs 2 --calls 2",
                       "--part-args", "gemv=--device cpu --dtype float32 --scale 16 --ms 2 --pairs 2 --calls 2",
                       "--part-args", "attention=--device cpu --dtype float32 --batches 2 --contexts 40 --pairs 2 "
                       "--calls 2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0, r
    fusion, gemv, attn = (r["parts"][p] for p in ("fusion", "gemv", "attention"))
    assert [(c["site"], c["M"]) for c in fusion["fusion"]] == [("qkv", 1), ("qkv", 3)]
    assert {c["site"] for c in gemv["gemv"]} == {"o_proj", "down_proj"}
    for c in fusion["fusion"] + gemv["gemv"]:
        assert c["rel_err"] < 1e-4 and c["floor_us"] > 0 and c["op_us"] > 0 and c["unfused_us"] > 0
    assert attn["attention"][0]["rel_err"] < 1e-4 and attn["attention"][0]["kv_tb_s"] >= 0


def test_check_ops_is_correctness_only(tmp_path) -> None:  # noqa: ANN001
    out = tmp_path / "check.json"
    rc = check.main(["--what", "ops", "--part-args", "ops=--device cpu --dtype float32 --scale 16 --sites qkv,o_proj "
                     "--batches 2 --contexts 40", "--out", str(out)])
    part = json.loads(out.read_text())["parts"]["ops"]
    assert rc == 0 and part["rc"] == 0 and part["failed"] == 0
    rows = part["fusion"] + part["gemv"] + part["attention"]
    assert [c["M"] for c in part["fusion"]][:3] == [1, 2, 3] and all(c["M"] <= 64 for c in part["gemv"])
    assert all(c["rel_err"] < 1e-4 and "op_us" not in c for c in rows)


def test_profile_prefill_part(ckpt: str, tmp_path) -> None:  # noqa: ANN001
    from benchmarks import profile as profile_script

    out = tmp_path / "profile.json"
    rc = profile_script.main(["--what", "prefill", "--model", ckpt, "--quick", "--part-args",
                              "prefill=--device cpu --dtype float32 --prompt-len 16 --warmup 1 --modes nofusion",
                              "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0, r
    part = r["parts"]["prefill"]
    assert part["rc"] == 0 and part["prompt_len"] == 16 and len(part["modes"][0]["ttft_ms"]) == 3


def test_plot_from_results(latency_result: dict, tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("matplotlib")
    gpu = tmp_path / "results" / "h100"
    gpu.mkdir(parents=True)
    (gpu / "latency.json").write_text(json.dumps(latency_result))
    (gpu / "throughput.json").write_text(json.dumps({"gpu": "NVIDIA H100", "date": "2026-01-01", "commit": "abc",
                                                     "output_tokens_per_s": {"fusion": 2.0, "nofusion": 1.0},
                                                     "floor_tokens_per_s": 3.0}))
    (gpu / "decode-chain.json").write_text(json.dumps({"gpu": "NVIDIA H100", "date": "2026-01-01", "commit": "abc",
                                                       "ablation": {"per_kernel_us_per_layer": {
                                                           "qkv": {"us_per_layer": 3.9, "bytes_floor_us": 2.8}}}}))
    assert plot.main(["--results", str(tmp_path / "results"), "--img", str(tmp_path / "img")]) == 0
    assert sorted(os.listdir(tmp_path / "img")) == ["decode_chain_h100.png", "latency_h100.png", "throughput.png"]


def test_decode_chain_breakdown_and_plot_of_the_scripts_own_json(tmp_path) -> None:  # noqa: ANN001
    pytest.importorskip("matplotlib")
    from benchmarks.harness.kernel_pdl_chain import per_kernel_breakdown

    ms = {"store": 0.7, "store+skip-attn": 0.5, "store+skip-qkv": 0.6}
    per = per_kernel_breakdown(ms, 28, 512, 3e12)
    # (0.7 - 0.5) ms / 28 layers = 7.14 us; K/V of 512 tokens: 2 * 512 * 8 * 128 * 2 bytes at 3 TB/s = 0.70 us
    assert per == {"attention": {"us_per_layer": 7.14, "bytes_floor_us": 0.7},
                   "qkv": {"us_per_layer": 3.57, "bytes_floor_us": 2.8}}
    gpu = tmp_path / "results" / "h100"
    gpu.mkdir(parents=True)
    (gpu / "decode-chain.json").write_text(json.dumps({"meta": {"gpu": {"name": "NVIDIA H100"}, "date_utc": "2026",
                                                                "git_commit": "abc"}, "per_kernel_us_per_layer": per}))
    assert plot.main(["--results", str(tmp_path / "results"), "--img", str(tmp_path / "img")]) == 0
    assert os.listdir(tmp_path / "img") == ["decode_chain_h100.png"]


def test_harness_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert accelerator.gpu_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert accelerator.gpu_slug("NVIDIA H200") == "h200"
    assert accelerator.gpu_slug("cpu") == "cpu"
    monkeypatch.setenv("OUT", "/x")
    assert results_io.results_path("latency", gpu="h200") == os.path.join("/x", "h200", "latency.json")
    monkeypatch.delenv("OUT")
    assert results_io.results_path("latency", gpu="h100") == os.path.join(results_io.RESULTS_DIR, "h100",
                                                                           "latency.json")
    assert [timing.pair_order(i) for i in range(3)] == [(0, 1), (1, 0), (0, 1)]
    seen: list[tuple[str, int]] = []
    pairs = timing.interleaved_pairs([lambda i: seen.append(("a", i)) or 1.0,
                                      lambda i: seen.append(("b", i)) or 2.0], 2)
    assert pairs == [(1.0, 2.0), (1.0, 2.0)] and seen == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    assert timing.ratio_stats([1.0, 3.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "pairs": 3}
    with pytest.raises(ValueError):
        engine.engine_kwargs("warp")
    t = engine.Timed(decode_s=0.5, decode_tokens=100)
    assert t.decode_step_ms(4) == pytest.approx(20.0)  # 25 steps of a batch of 4 in 0.5 s


def test_first_runs_script(tiny_ckpt: str, tmp_path) -> None:  # noqa: ANN001
    """benchmarks/first_runs.py on the CPU (fusion: the first run compiles the graphs, the second compiles nothing):
    the JSON has the header, one entry per run with its compiles and Dynamo counters."""
    out = tmp_path / "first-runs.json"
    r = subprocess.run([sys.executable, "benchmarks/first_runs.py", "--model", tiny_ckpt, "--requests", "1", "--runs",
                        "2", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["gpu"] and d["command"].startswith("python benchmarks/first_runs.py") and d["requests"] == 1
    phases = d["build_phases_s"]  # rounded to 10 ms: a tiny checkpoint's load may round to 0.0
    assert "load" in phases and min(phases.values()) >= 0 and d["build_s"] > 0
    assert sum(phases.values()) <= d["build_s"] + 0.01 * len(phases), (phases, d["build_s"])
    first, second = d["runs"]
    assert first["dynamo_counters"] and not second["dynamo_counters"], (first, second)
    assert second["output_tokens_per_s"] > 0 and "| 2 |" in r.stdout
