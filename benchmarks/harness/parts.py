"""Run the parts of a benchmark that covers several measurements (kernels, profile, check) and merge their JSON
into one file: the :func:`benchmarks.harness.provenance.header` keys, then ``parts`` {name: the part's own JSON plus
``rc`` and ``seconds``}. Each part is a harness module with ``main(argv) -> int`` that writes ``--out``."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from . import accelerator, provenance, results_io


@dataclass(frozen=True)
class Part:
    """One measurement: the harness module that runs it, its default arguments, whether it needs ``--model``."""

    module: str
    help: str
    args: tuple[str, ...] = ()
    needs_model: bool = False
    quick_args: tuple[str, ...] = field(default=())  # added with --quick


def add_arguments(ap: argparse.ArgumentParser, parts: dict[str, Part], default: str) -> None:
    """The flags every multi-part script shares: --what, --model, --quick, --part-args, --budget-s, --out."""
    lines = "; ".join(f"{k}: {p.help}" for k, p in parts.items())
    ap.add_argument("--what", default=default, help=f"comma list of parts ({lines})")
    ap.add_argument("--model", default="/tmp/qwen3-0.6b", help="checkpoint of the parts that need one")
    ap.add_argument("--quick", action="store_true", help="the parts' short variants where they have one")
    ap.add_argument("--part-args", action="append", default=[], metavar="PART=ARGS",
                    help="extra arguments of one part, e.g. --part-args 'fusion=--reps 3' (repeatable)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no new part after this many seconds")
    ap.add_argument("--out", default=None, help="JSON path (default: results/<gpu>/<benchmark>.json)")


def selected(ap: argparse.ArgumentParser, args: argparse.Namespace, parts: dict[str, Part]) -> list[str]:
    """The parts named by --what, in order (argparse error on an unknown one or a bad --part-args)."""
    names = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = [n for n in names if n not in parts]
    if bad or not names:
        ap.error(f"--what: unknown or no part {bad}; choose from {sorted(parts)}")
    for pa in args.part_args:
        if "=" not in pa or pa.split("=", 1)[0] not in parts:
            ap.error(f"--part-args must be PART=ARGS with PART one of {sorted(parts)}, got {pa!r}")
    return names


def run(bench: str, script: str, argv: list[str], args: argparse.Namespace, names: list[str],
        parts: dict[str, Part]) -> int:
    """Run the parts one after the other, writing the merged JSON after each. Returns 0 when every part returned
    0, else 1 (a part that raised is recorded with its error and the next one still runs)."""
    t0 = time.perf_counter()
    path = results_io.results_path(bench, args.out)
    res: dict[str, Any] = {**provenance.header(argv, script), "parts": {}}
    extra = {k: shlex.split(v) for k, v in (pa.split("=", 1) for pa in args.part_args)}
    failed = False
    for name in names:
        part = parts[name]
        if time.perf_counter() - t0 > args.budget_s:
            res["parts"][name] = {"skipped": "budget"}
            failed = True
            continue
        fd, tmp = tempfile.mkstemp(suffix=".json", prefix=f"{bench}-{name}-")
        os.close(fd)
        os.remove(tmp)
        part_argv = [*part.args, *(part.quick_args if args.quick else ()), *(["--model", args.model]
                     if part.needs_model else []), *extra.get(name, []), "--out", tmp]
        print(f"\n=== {bench} part {name}: {part.module} {shlex.join(part_argv)}", flush=True)
        t1 = time.perf_counter()
        entry: dict[str, Any]
        try:
            rc = importlib.import_module(f"benchmarks.harness.{part.module}").main(part_argv)
            entry = {}
            if os.path.exists(tmp):
                with open(tmp) as f:
                    loaded = json.load(f)
                entry = loaded if isinstance(loaded, dict) else {"result": loaded}
                os.remove(tmp)
            entry["rc"] = int(rc or 0)
        except SystemExit as e:
            entry = {"rc": e.code if isinstance(e.code, int) else 2, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - recorded; the next part still runs
            traceback.print_exc()
            entry = {"rc": 1, "error": f"{type(e).__name__}: {e}"}
        entry["seconds"] = round(time.perf_counter() - t1, 1)
        entry["part_args"] = part_argv[:-2]
        failed |= entry["rc"] != 0
        res["parts"][name] = entry
        results_io.write_json(path, res)
        accelerator.free_accelerator_memory()
    res["total_s"] = round(time.perf_counter() - t0, 1)
    results_io.write_json(path, res)
    print(f"\n{bench}: " + ", ".join(f"{n} rc={res['parts'][n].get('rc', '-')}" for n in names) + f"; wrote {path}")
    return 1 if failed else 0


def main(doc: str, bench: str, script: str, default: str, parts: dict[str, Part], argv: list[str] | None) -> int:
    """The command line of a multi-part script: the shared flags (:func:`add_arguments`; ``doc``'s first paragraph
    is the description, the whole of it the epilog), then :func:`run` on the selected parts. Returns 0 when every
    part succeeded, else 1 (argparse exits with 2 on bad flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    add_arguments(ap, parts, default)
    args = ap.parse_args(argv)
    return run(bench, script, argv, args, selected(ap, args, parts), parts)
