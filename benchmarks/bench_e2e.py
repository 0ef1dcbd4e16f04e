"""Latency, throughput and the decode profile with ONE engine build per mode.

Building an engine on the H200 takes 60-185 s (Inductor compile, the fusion pass's pretune, ~20 CUDA-graph
captures), and bench_latency.py, bench_throughput.py and profile_decode.py each build their own engine per mode.
This driver builds one ``LLM`` per mode (``fusion``, ``nofusion``, ``eager``; see bench_latency.MODES) and runs
on it, in the order of ``--what``, each selected part through that script's own measurement function:

- ``latency``:    ``bench_latency.measure_mode(..., llm=engine)`` (TTFT / TPOT per batch size)
- ``throughput``: ``bench_throughput.run_mode(..., llm=engine)`` (nano-vLLM's 256-request workload)
- ``profile``:    ``profile_decode.run_mode(..., llm=engine)`` (torch.profiler of decode steps)

A part runs for a mode only when the mode is in that part's mode list (``--latency-modes``, default
fusion,nofusion,eager,fusion-ms8,nofusion-ms8; ``--throughput-modes``, default fusion,nofusion,fusion-ms8,
nofusion-ms8; ``--profile-modes``, default fusion,nofusion). Modes that differ only in ``num_scheduler_steps``
(``fusion`` and ``fusion-ms8``) share one engine build (``common.build_key``). An engine is
built only for a mode that some selected part needs. After the last engine, ``--peer`` times the transformers
peer once (bench_throughput.run_peer). Between modes the engine is shut down and the GPU memory released.

The engine suits every part: LLM(model, dtype, max_model_len=4096, max_num_seqs=max(256, largest latency /
profile batch), max_num_batched_tokens=16384, gpu_memory_utilization=0.9, tensor_parallel_size, seed, and the
mode's compile_fusion / enforce_eager: CUDA graphs for fusion and nofusion, none for eager). The standalone
scripts differ only in max_num_seqs (latency: its largest batch; throughput: 512; profile: 256), which here is
the same for every part.

Output, in ``--out-dir`` (default benchmarks/results on a CUDA machine, <tempdir>/bench-e2e-cpu elsewhere):
latency-h200.json, throughput-h200.json and decode-profile-h200.json, in exactly the formats of the standalone
scripts (same top-level keys, speedups included). Differences: ``meta.command`` is this driver's command line;
``meta.e2e`` describes the run (engine keywords and build time per mode, every (mode, part) with its status and
seconds); every mode entry measured here has ``prebuilt_engine: true`` and ``init_s`` = the build time of the
engine it shared with the other parts (the same number in the three files, not a per-part cost); ``total_s`` is
the time since this driver started. A JSON is written once its part has a first result and rewritten after
every part (and after every latency batch size and profile case), so a run killed by a time limit keeps what it
measured.

Deadline (``--budget-s``, from the start of this script): a mode's engine is built only when at least
``--min-mode-s`` seconds are left; a part starts only before the deadline; the peer too. What cannot start is
recorded as skipped in its JSON (latency / throughput mode entry ``{"skipped": true, "note": ...}``, profile as
profile_decode.py records a mode it did not build) and in ``meta.e2e.parts``. The latency part gets the
remaining time as its own deadline (after it, every remaining batch size gets one repetition); the profile part
starts no new case after the deadline.

Exit status: 0 when every part that ran succeeded (skipped parts do not count as failures), 1 otherwise.

Usage (H200; one device command of at most 10 minutes)::

    python benchmarks/bench_e2e.py --model /tmp/qwen3-0.6b --peer --budget-s 520
    python benchmarks/bench_e2e.py --modes fusion,nofusion --what throughput,profile --peer

CPU smoke test (tiny checkpoint with a vocabulary over 10000, as the throughput workload needs)::

    python -c "from nanovllm.utils.tiny_model import build_tiny_checkpoint as b; b('/tmp/tinyck10k', vocab_size=10240)"
    python benchmarks/bench_e2e.py --model /tmp/tinyck10k --device cpu --modes eager,fusion --max-num-seqs 4 \\
        --latency-batches 1,2 --latency-max-tokens 4 --latency-prompt-len 32 --latency-reps 1:1,2:1 \\
        --num-seqs 4 --min-input-len 16 --max-input-len 64 --min-output-len 4 --max-output-len 16 \\
        --profile-batches 1,2 --profile-steps 2 --profile-prompt-len 32 --peer --peer-num-seqs 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.add_repo_to_path()
import bench_latency  # noqa: E402
import bench_throughput  # noqa: E402
import profile_decode  # noqa: E402

MODES: dict[str, dict[str, Any]] = bench_latency.MODES
PARTS: tuple[str, ...] = ("latency", "throughput", "profile")
FILES: dict[str, str] = {"latency": "latency-h200.json", "throughput": "throughput-h200.json",
                         "profile": "decode-profile-h200.json"}


def _names(spec: str, allowed: Any, what: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (order kept, duplicates dropped); SystemExit on a name not in ``allowed``."""
    out: list[str] = []
    for n in (x.strip() for x in spec.split(",")):
        if n and n not in out:
            out.append(n)
    bad = [n for n in out if n not in allowed]
    if bad:
        raise SystemExit(f"{what}: unknown name(s) {bad}; choose from {sorted(allowed)}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring). Part options left unset take the standalone script's default."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default=profile_decode.DEFAULT_CKPT,
                    help=f"checkpoint folder (default {profile_decode.DEFAULT_CKPT}, built with "
                         "scripts/make_qwen3_06b_checkpoint.py when missing)")
    ap.add_argument("--modes", default="fusion,nofusion,eager",
                    help=f"engine modes, built one after the other in this order (of {sorted(MODES)})")
    ap.add_argument("--what", default="latency,throughput,profile",
                    help=f"parts to run on each mode's engine, in this order (of {list(PARTS)})")
    ap.add_argument("--latency-modes", default="fusion,nofusion,eager,fusion-ms8,nofusion-ms8",
                    help="modes that run the latency part")
    ap.add_argument("--throughput-modes", default="fusion,nofusion,fusion-ms8,nofusion-ms8",
                    help="modes that run the throughput part (the first one run is the headline figure)")
    ap.add_argument("--profile-modes", default="fusion,nofusion", help="modes that run the decode profile part")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="global deadline in seconds from the start: parts (and engines) that cannot start before it "
                         "are skipped and recorded as skipped")
    ap.add_argument("--min-mode-s", type=float, default=30.0,
                    help="build a mode's engine only when at least this many seconds are left before the deadline")
    ap.add_argument("--out-dir", default=None,
                    help="folder of the three JSONs (default: benchmarks/results on a CUDA machine, else "
                         "<tempdir>/bench-e2e-cpu, so CPU runs never overwrite the committed GPU results)")
    g = ap.add_argument_group("latency (bench_latency.py; unset = its default)")
    g.add_argument("--latency-batches", default=None, help="comma list of batch sizes (1,8,32,128,256)")
    g.add_argument("--latency-max-tokens", type=int, default=None, help="T of the TPOT formula, >= 2 (128)")
    g.add_argument("--latency-reps", default=None, help="'B:n,...' repetitions per batch (5 to B=8, 3 to 32, else 2)")
    g.add_argument("--latency-prompt-len", type=int, default=None, help="prompt tokens (512)")
    g = ap.add_argument_group("throughput (bench_throughput.py; unset = its default)")
    g.add_argument("--num-seqs", type=int, default=None, help="requests (256)")
    g.add_argument("--repeat", type=int, default=None, help="timed generate calls per mode, median reported (1)")
    g.add_argument("--max-input-len", type=int, default=None, help="prompt lengths randint(min, this) (1024)")
    g.add_argument("--max-output-len", type=int, default=None, help="max_tokens randint(min, this) (1024)")
    g.add_argument("--min-input-len", type=int, default=None, help="(100; smaller only for test workloads)")
    g.add_argument("--min-output-len", type=int, default=None, help="(100; smaller only for test workloads)")
    g.add_argument("--no-split", action="store_true", help="see bench_throughput.py")
    g.add_argument("--peer", action=argparse.BooleanOptionalAction, default=False,
                   help="time the transformers peer once, after the engines (--no-peer: not; the last one given wins)")
    g.add_argument("--peer-num-seqs", type=int, default=None, help="the peer runs the first N requests (32)")
    g = ap.add_argument_group("profile (profile_decode.py; unset = its default)")
    g.add_argument("--profile-batches", default=None, help="comma list of decode batch sizes (1,64,256)")
    g.add_argument("--profile-steps", type=int, default=None, help="decode steps timed, then profiled (20)")
    g.add_argument("--profile-warmup-steps", type=int, default=None, help="untimed decode steps first (3)")
    g.add_argument("--profile-prompt-len", type=int, default=None, help="prompt tokens (512)")
    g.add_argument("--profile-temperature", type=float, default=None, help="0 = greedy (0.6)")
    g.add_argument("--top-kernels", type=int, default=None, help="(15)")
    g.add_argument("--trace-dir", default=None, help="keep the Chrome traces here (default: deleted)")
    g = ap.add_argument_group("engine (one LLM per mode, shared by the parts)")
    g.add_argument("--device", default=None, choices=["cuda", "cpu"])
    g.add_argument("--dtype", default="auto")
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--max-model-len", type=int, default=4096)
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: max(256, the largest latency / profile batch that runs)")
    g.add_argument("--max-num-batched-tokens", type=int, default=16384)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0, help="LLM(seed=...), prompt and workload seeds")
    return ap.parse_args(argv)


def default_out_dir() -> str:
    """benchmarks/results when CUDA is available, else <tempdir>/bench-e2e-cpu."""
    try:
        import torch
        cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        cuda = False
    return common.RESULTS_DIR if cuda else os.path.join(tempfile.gettempdir(), "bench-e2e-cpu")


def _opt(flag: str, value: Any) -> list[str]:
    """[flag, str(value)] when value is not None (True: [flag]; False: [])."""
    if value is None or value is False:
        return []
    return [flag] if value is True else [flag, str(value)]


class Driver:
    """State of one run: the three result documents, the shared metadata, the deadline, the part log."""

    def __init__(self, args: argparse.Namespace, argv: list[str] | None) -> None:
        self.t_start = time.perf_counter()
        self.args = args
        self.modes = _names(args.modes, MODES, "--modes")
        self.what = _names(args.what, PARTS, "--what")
        part_modes = {"latency": _names(args.latency_modes, MODES, "--latency-modes"),
                      "throughput": _names(args.throughput_modes, MODES, "--throughput-modes"),
                      "profile": _names(args.profile_modes, MODES, "--profile-modes")}
        # per part: the modes it runs on, in the order of --modes
        self.part_modes = {p: [m for m in self.modes if m in part_modes[p]] if p in self.what else [] for p in PARTS}
        self.model = profile_decode.ensure_checkpoint(
            None if os.path.abspath(args.model) == os.path.abspath(profile_decode.DEFAULT_CKPT) else args.model)
        self.deadline = self.t_start + args.budget_s
        self.out_dir = args.out_dir or default_out_dir()
        self.paths = {p: os.path.join(self.out_dir, FILES[p]) for p in PARTS}
        self.meta = common.run_metadata(None if argv is None else [sys.argv[0], *argv])
        self.info: dict[str, Any] = {
            "driver": "benchmarks/bench_e2e.py",
            "note": "one engine per mode, shared by the parts; a mode entry's init_s is that shared engine's build "
                    "time (the same in every part's file), not a per-part cost; total_s counts from the driver's "
                    "start",
            "what": self.what, "part_modes": self.part_modes, "budget_s": args.budget_s,
            "engine_kwargs": {}, "build_s": {}, "parts": [],
        }
        self.meta["e2e"] = self.info
        self.failures: list[str] = []
        self.touched: set[str] = set()
        self._setup_parts()

    # ---------------------------------------------------------------------------------------- setup
    def _common_flags(self) -> list[str]:
        a = self.args
        return ["--model", self.model, "--dtype", a.dtype, "--max-model-len", str(a.max_model_len),
                "--max-num-batched-tokens", str(a.max_num_batched_tokens),
                "--gpu-memory-utilization", str(a.gpu_memory_utilization), "--seed", str(a.seed)] + \
            _opt("--device", a.device)

    def _setup_parts(self) -> None:
        """Parse each part's own arguments (so unset options get the standalone defaults), pick max_num_seqs, build
        the empty result documents; check the throughput workload against the vocabulary before any engine."""
        a = self.args
        flags, tp = self._common_flags(), ["--tensor-parallel-size", str(a.tensor_parallel_size)]
        lm = self.part_modes["latency"]
        self.lat_args = bench_latency.parse_args(
            flags + tp + ["--out", self.paths["latency"], "--modes", ",".join(lm or ["fusion"])]
            + _opt("--batches", a.latency_batches) + _opt("--max-tokens", a.latency_max_tokens)
            + _opt("--reps", a.latency_reps) + _opt("--prompt-len", a.latency_prompt_len))
        self.lat_batches = [int(b) for b in self.lat_args.batches.split(",")]
        self.lat_reps = bench_latency.parse_reps(self.lat_args.reps, self.lat_batches)
        pm = self.part_modes["profile"]
        prof_argv = (flags + ["--out", self.paths["profile"], "--modes", ",".join(pm or ["fusion"]),
                              "--budget-s", str(a.budget_s)]
                     + _opt("--batches", a.profile_batches) + _opt("--steps", a.profile_steps)
                     + _opt("--warmup-steps", a.profile_warmup_steps) + _opt("--prompt-len", a.profile_prompt_len)
                     + _opt("--temperature", a.profile_temperature) + _opt("--top-kernels", a.top_kernels)
                     + _opt("--trace-dir", a.trace_dir))
        prof_batches = [int(b) for b in profile_decode.parse_args(prof_argv).batches.split(",") if b.strip()]
        need = ([max(self.lat_batches)] if lm else []) + ([max(prof_batches)] if pm else [])
        self.max_num_seqs = a.max_num_seqs or max([256] + need)
        if lm and max(self.lat_batches) > self.max_num_seqs:
            raise SystemExit(f"--max-num-seqs {self.max_num_seqs} < the largest latency batch {max(self.lat_batches)}")
        self.prof_args = profile_decode.parse_args(prof_argv + ["--max-num-seqs", str(self.max_num_seqs)])
        self.prof_batches = prof_batches
        # the headline throughput figure is the first mode of --throughput-modes (its order, not --modes')
        tm = [m for m in _names(a.throughput_modes, MODES, "--throughput-modes") if m in self.part_modes["throughput"]]
        self.tp_args = bench_throughput.parse_args(
            flags + tp + ["--out", self.paths["throughput"], "--max-num-seqs", str(self.max_num_seqs)]
            + _opt("--modes", ",".join(tm) or None) + _opt("--num-seqs", a.num_seqs) + _opt("--repeat", a.repeat)
            + _opt("--max-input-len", a.max_input_len) + _opt("--max-output-len", a.max_output_len)
            + _opt("--min-input-len", a.min_input_len) + _opt("--min-output-len", a.min_output_len)
            + _opt("--no-split", a.no_split) + _opt("--peer", a.peer) + _opt("--peer-num-seqs", a.peer_num_seqs))
        self.run_peer = a.peer and "throughput" in self.what
        if a.peer and not self.run_peer:
            print("--peer ignored: 'throughput' is not in --what", flush=True)
        self.prompts: list[list[int]] = []
        self.max_tokens: list[int] = []
        if tm or self.run_peer:
            self.prompts, self.max_tokens = bench_throughput.workload(self.tp_args)  # SystemExit on a small vocab
        self.lat = bench_latency.new_result(self.lat_args, self.lat_batches, self.lat_reps, meta=self.meta)
        self.tp = bench_throughput.new_result(self.tp_args, tm, self.prompts, self.max_tokens, meta=self.meta) \
            if (tm or self.run_peer) else {}
        self.prof_shapes: dict[str, Any] = {}
        self.prof = profile_decode.new_result(self.prof_args, self.prof_batches, meta=self.meta)
        self.shape_of = profile_decode.shape_getter(common.load_hf_config(self.model), self.prof_shapes)
        self.info["max_num_seqs"] = self.max_num_seqs

    # ---------------------------------------------------------------------------------------- output
    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        """Rewrite the JSON of every part that has a result so far."""
        total = round(time.perf_counter() - self.t_start, 1)
        self.info["elapsed_s"] = total
        if "latency" in self.touched:
            bench_latency.update_speedups(self.lat)
            self.lat["total_s"] = total
            common.write_json(self.paths["latency"], self.lat)
        if "throughput" in self.touched:
            bench_throughput.update_derived(self.tp)
            common.write_json(self.paths["throughput"], self.tp)
        if "profile" in self.touched:
            self.prof.update(self.prof_shapes)
            self.prof["total_s"] = total
            common.write_json(self.paths["profile"], self.prof)

    def record(self, part: str, mode: str, entry: dict[str, Any], status: str, seconds: float | None,
               note: str | None = None) -> None:
        """Put one (mode, part) result into its document and the part log, then save."""
        doc = {"latency": self.lat, "throughput": self.tp, "profile": self.prof}[part]
        doc["modes"][mode] = entry
        self.touched.add(part)
        row: dict[str, Any] = {"mode": mode, "part": part, "status": status,
                               "seconds": None if seconds is None else round(seconds, 1)}
        if note:
            row["note"] = note
        self.info["parts"] = [r for r in self.info["parts"] if (r["mode"], r["part"]) != (mode, part)] + [row]
        if status == "error":
            self.failures.append(f"{mode}/{part}")
        self.save()

    def skipped_entry(self, part: str, mode: str, note: str) -> dict[str, Any]:
        if part == "profile":
            return profile_decode.skipped_mode(mode, self.prof_batches, note)
        entry: dict[str, Any] = {"mode": mode, "skipped": True, "note": note}
        if part == "latency":
            entry["batches"] = {}
        return entry

    # ---------------------------------------------------------------------------------------- parts
    def run_part(self, part: str, mode: str, llm: Any, kw: dict[str, Any], init_s: float) -> dict[str, Any]:
        """One part on the mode's engine; returns its mode entry (partial results are saved as they come)."""
        if part == "latency":
            def on_batch(res: dict[str, Any]) -> None:
                self.lat["modes"][mode] = res
                self.touched.add("latency")
                self.save()
            return bench_latency.measure_mode(mode, self.lat_args, self.lat_batches, self.lat_reps,
                                              deadline=self.deadline, llm=llm, engine_kwargs=kw, init_s=init_s,
                                              on_batch=on_batch)
        if part == "throughput":
            return bench_throughput.run_mode(mode, self.tp_args, self.prompts, self.max_tokens, llm=llm,
                                             engine_kwargs=kw, init_s=init_s)

        def on_case(res: dict[str, Any]) -> None:
            self.prof["modes"][mode] = res
            self.touched.add("profile")
            self.save()
        res = profile_decode.run_mode(mode, self.prof_batches, self.prof_args, self.shape_of, self.deadline, on_case,
                                      llm=llm, engine_kwargs=kw, init_s=init_s)
        bad = [b for b, c in res.get("batches", {}).items() if "error" in c]
        if bad:
            self.failures.append(f"{mode}/profile/B={','.join(bad)}")
        return res

    def engine_kwargs(self, mode: str) -> dict[str, Any]:
        return common.engine_kwargs(self.args, mode, self.max_num_seqs)

    def run_group(self, modes: list[str]) -> None:
        """Build one engine for modes that differ only in ``num_scheduler_steps`` (:func:`common.build_key`), run
        each mode's parts on it (setting the engine's ``num_scheduler_steps`` per mode), shut it down."""
        parts = {m: [p for p in self.what if m in self.part_modes[p]] for m in modes}
        modes = [m for m in modes if parts[m]]
        if not modes:
            return
        label = "+".join(modes)
        if self.left() < self.args.min_mode_s:
            note = (f"engine not built: {max(self.left(), 0):.0f} s left of --budget-s {self.args.budget_s:g} "
                    f"(--min-mode-s {self.args.min_mode_s:g})")
            print(f"\n=== mode {label}: skipped ({note})", flush=True)
            for m in modes:
                for p in parts[m]:
                    self.record(p, m, self.skipped_entry(p, m, note), "skipped", None, note)
            return
        from nanovllm import LLM

        kws = {m: self.engine_kwargs(m) for m in modes}
        build_kw = kws[modes[0]] | {"num_scheduler_steps": max(k["num_scheduler_steps"] for k in kws.values())}
        for m in modes:
            self.info["engine_kwargs"][m] = common._jsonable(kws[m])
        print(f"\n=== mode {label}: LLM({self.model!r}, {build_kw}) for "
              f"{'; '.join(f'{m}: ' + ', '.join(parts[m]) for m in modes)} ({self.left():.0f} s left of the budget)",
              flush=True)
        t0 = time.perf_counter()
        try:
            llm = LLM(self.model, **build_kw)
        except Exception as e:  # noqa: BLE001 - record and go on with the next mode
            traceback.print_exc()
            err = f"engine build failed: {type(e).__name__}: {e}"
            for m in modes:
                for p in parts[m]:
                    entry = {"mode": m, "error": err} | ({"batches": {}} if p == "profile" else {})
                    self.record(p, m, entry, "error", None, err)
            common.free_accelerator_memory(report=True)
            return
        init_s = time.perf_counter() - t0
        phases = getattr(getattr(llm.engine, "model_runner", None), "init_seconds", {})
        for m in modes:
            self.info["build_s"][m] = round(init_s, 2)
            self.info.setdefault("build_phases_s", {})[m] = {k: round(v, 2) for k, v in phases.items()}
        print(f"[{label}] engine built in {init_s:.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in phases.items())})", flush=True)
        try:
            for m in modes:
                llm.engine.config.num_scheduler_steps = kws[m]["num_scheduler_steps"]
                self._run_parts(m, parts[m], llm, kws[m], init_s)
        finally:
            common.shutdown_engine(llm)
            del llm
            common.free_accelerator_memory(report=True)

    def _run_parts(self, mode: str, parts: list[str], llm: Any, kw: dict[str, Any], init_s: float) -> None:
        """The mode's parts, one after the other, on the built engine."""
        for p in parts:
            if self.left() <= 0:
                note = f"not started: --budget-s {self.args.budget_s:g} passed"
                print(f"[{mode}] {p}: skipped ({note})", flush=True)
                self.record(p, mode, self.skipped_entry(p, mode, note), "skipped", None, note)
                continue
            t1 = time.perf_counter()
            try:
                entry, status = self.run_part(p, mode, llm, kw, init_s), "ok"
            except Exception as e:  # noqa: BLE001 - record and go on with the next part
                traceback.print_exc()
                entry = {"mode": mode, "error": f"{type(e).__name__}: {e}"}
                if p == "profile":  # as profile_decode.py records a failed mode
                    entry["batches"] = {}
                status = "error"
            self.record(p, mode, entry, status, time.perf_counter() - t1)
            print(f"[{mode}] {p}: {status} in {time.perf_counter() - t1:.1f} s "
                  f"({self.left():.0f} s left of the budget)", flush=True)

    def peer(self) -> None:
        """The transformers peer, once, into the throughput document."""
        t1 = time.perf_counter()
        if self.left() <= 0:
            note = f"not started: --budget-s {self.args.budget_s:g} passed"
            print(f"peer: skipped ({note})", flush=True)
            self.tp["peer"], status = {"skipped": True, "note": note}, "skipped"
        else:
            try:
                self.tp["peer"], status = bench_throughput.run_peer(self.tp_args, self.prompts, self.max_tokens), "ok"
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self.tp["peer"], status = {"error": f"{type(e).__name__}: {e}"}, "error"
                self.failures.append("peer")
        self.touched.add("throughput")
        row: dict[str, Any] = {"mode": None, "part": "peer", "status": status,
                               "seconds": round(time.perf_counter() - t1, 1)}
        if status != "ok":
            row["note"] = self.tp["peer"].get("note") or self.tp["peer"].get("error")
        self.info["parts"].append(row)
        self.save()

    def run(self) -> int:
        print(f"bench_e2e: modes {self.modes}, parts {self.part_modes}, max_num_seqs {self.max_num_seqs}, "
              f"budget {self.args.budget_s:g} s, out {self.out_dir}", flush=True)
        if self.tp:
            w = self.tp["workload"]
            print(f"throughput workload: {w['num_seqs']} requests, {w['prompt_tokens']:,} prompt tokens, "
                  f"{w['output_tokens']:,} output tokens", flush=True)
        groups: dict[tuple, list[str]] = {}  # modes sharing one engine build, in the order of --modes
        for mode in self.modes:
            groups.setdefault(common.build_key(mode), []).append(mode)
        for modes in groups.values():
            self.run_group(modes)
        if self.run_peer:
            self.peer()
        self.save()
        self.report()
        return 1 if self.failures else 0

    def report(self) -> None:
        """The standalone scripts' tables for what ran, then one line per (mode, part)."""
        if "latency" in self.touched:
            bench_latency.print_summary(self.lat, [m for m in self.part_modes["latency"] if m in self.lat["modes"]])
        if "throughput" in self.touched:
            bench_throughput.print_summary(self.tp)
        if "profile" in self.touched and any(r.get("batches") for r in self.prof["modes"].values()):
            profile_decode.print_report(self.prof)
        rows = [[r["mode"] or "-", r["part"], r["status"], r["seconds"], r.get("note", "")]
                for r in self.info["parts"]]
        common.print_table(["mode", "part", "status", "seconds", "note"], rows,
                           title=f"bench_e2e: engine builds {self.info['build_s']} s; "
                                 f"total {self.info.get('elapsed_s')} s of --budget-s {self.args.budget_s:g}")
        for p in PARTS:
            if p in self.touched:
                print(f"wrote {self.paths[p]}")
        if self.failures:
            print(f"FAILED: {self.failures}")


def main(argv: list[str] | None = None) -> int:
    """Run every selected (mode, part) on one engine per mode; write the three JSONs. Returns the exit status."""
    args = parse_args(argv)
    return Driver(args, argv).run()


if __name__ == "__main__":
    sys.exit(main())
