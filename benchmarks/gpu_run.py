"""The GPU path in one run inside a time budget: verify, bench and export svt-s and pcpvt-s on torch CUDA.

    benchmarks/gpu_run.sh                           # on the GPU machine: installs offline, then runs this
    DRY_RUN=1 OUT=/tmp/run benchmarks/gpu_run.sh    # the same steps on the CPU: a tiny model, one batch size

Steps, cheapest first, so that a short budget still leaves figures for both models (seeded random weights):

1. verify: torch fp16 and bf16 against fp32 on the same device, and CUDA fp32 against CPU fp32, on 32
   seeded synthetic images (engines/verify.py: max abs, lowest per-image cosine, top-1/top-5 agreement);
2. bench fp32, fp16 and bf16, each eager and replayed as CUDA graphs, at batch 1, 8, 64 and 256
   (engines/bench.py: interleaved rounds, end-to-end time with host arrays in and out, device time from
   CUDA events);
3. the ONNX export (dynamic batch, verified on onnxruntime CPU), timed;
4. torch.compile (inductor) of each precision, benched against eager in the same rounds, bf16 first:
   a compile takes tens of seconds, so these are the steps the clock skips.

fp32 is IEEE fp32: TF32 is turned off for matmuls and convolutions. Before each step the clock is read:
a step that would not end before the deadline is skipped and the report says so, and an alarm stops a
step still running GRACE_S after it; a step that fails (a package that cannot load, a CUDA error) is
recorded with its error and the run goes on. gpu-run.json and
gpu-run.md are rewritten after every step, so a run cut short still leaves what it measured. Exit 1 when
a step failed.
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

MODELS = ("svt-s", "pcpvt-s")
PRECISIONS = ("fp32", "fp16", "bf16")
BATCHES = (1, 8, 64, 256)
COMPILE_ORDER = ("bf16", "fp16", "fp32")  # compiles are the costly steps: the ones worth most go first
PACKAGES = ("torch", "triton", "numpy", "onnx", "onnxscript", "onnxruntime", "twins_deploy", "tensorrt")
RESERVE_S = 10.0  # a step starts only if its estimate ends this long before the deadline
GRACE_S = 15  # past the deadline, the alarm stops the step in flight and the run
FIRST_COMPILE_S = 120.0  # what a torch.compile is assumed to take until one has been timed
TINY_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "index.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """What the run measures and how long each measurement lasts."""

    device: str
    models: dict  # label -> (registry name, constructor arguments replacing the variant's or None)
    batches: tuple[int, ...]
    bench_seconds: float  # per engine and batch size, over all rounds
    rounds: int
    warmup: int  # runs after the first call (which compiles or captures) and before timing
    compile_backend: str
    verify_samples: int

    def as_dict(self) -> dict:
        return {"device": self.device, "models": {label: {"name": name, "config": config}
                                                  for label, (name, config) in self.models.items()},
                "batches": list(self.batches), "bench_seconds_per_engine": self.bench_seconds, "rounds": self.rounds,
                "warmup": self.warmup, "compile_backend": self.compile_backend, "verify_samples": self.verify_samples}


def gpu_plan() -> Plan:
    return Plan("cuda", {name: (name, None) for name in MODELS}, BATCHES, bench_seconds=0.75, rounds=3, warmup=3,
                compile_backend="inductor", verify_samples=32)


def dry_run_plan() -> Plan:
    """The CPU stand-in: svt-s in the tiny golden configuration of the tests, one batch size, and
    torch.compile's "eager" backend (dynamo traces the model, no code is generated: inductor takes
    minutes on a small CPU)."""
    tiny = json.loads(TINY_CONFIGS.read_text())["tiny-svt"]["config"]
    return Plan("cpu", {"tiny-svt": ("svt-s", tiny)}, (1,), bench_seconds=0.3, rounds=2, warmup=1,
                compile_backend="eager", verify_samples=8)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message, cut to 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def probe_packages(names=PACKAGES) -> dict:
    """Each package's version, or the error its import raised: the report says what could not load."""
    found = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # a broken install raises anything, not only ImportError
            found[name] = {"loaded": False, "error": one_line(exc)}
        else:
            found[name] = {"loaded": True, "version": str(getattr(module, "__version__", "?")),
                           "path": str(Path(module.__file__).parent) if getattr(module, "__file__", None) else None}
    return found


def nvidia_smi() -> dict | None:
    """GPU name, driver and memory as nvidia-smi reports them; None without nvidia-smi."""
    query = ("name", "driver_version", "memory.total")
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(query)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return dict(zip(query, (value.strip() for value in done.stdout.splitlines()[0].split(","))))


class OutOfTime(BaseException):
    """Raised by the alarm set at the deadline plus GRACE_S: ends the step in flight and the run."""


def _out_of_time(signum, frame) -> None:
    raise OutOfTime


class Run:
    """The clock, the record of every step, and the two report files rewritten after each step."""

    def __init__(self, out: Path, started: float, budget_s: float, plan: Plan, dry_run: bool, install: str):
        self.out, self.deadline, self.plan = out, started + budget_s, plan
        self.learned: dict = {}  # step kind -> seconds the last such step took: the next one's estimate
        self.failed = False
        self.record = {"schema_version": SCHEMA_VERSION, "dry_run": dry_run, "status": "running", "current": None,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                       "budget_s": budget_s, "elapsed_s": 0.0, "install": install, "nvidia_smi": None,
                       "machine": None, "packages": {}, "settings": plan.as_dict(), "steps": [], "verify": [],
                       "bench": [], "export": []}
        self._started = started

    def left(self) -> float:
        return self.deadline - time.time()

    def step(self, name: str, action: Callable[[], object], estimate_s: float, kind: str | None = None):
        """Run ``action`` if it fits before the deadline; record ok, failed (with the error) or skipped.
        Returns (status, what the action returned)."""
        entry = {"step": name, "status": "skipped", "seconds": None, "note": ""}
        self.record["steps"].append(entry)
        need, left = self.learned.get(kind, estimate_s), self.left() - RESERVE_S
        if need > left:
            entry["note"] = f"out of time: needs ~{need:.0f} s, {max(left, 0.0):.0f} s left"
            self._log(entry)
            self.write()
            return "skipped", None
        self.record["current"] = name
        self.write()
        start, result = time.perf_counter(), None
        try:
            result = action()
            entry["status"] = "ok"
        except OutOfTime:
            entry.update(status="stopped", note="the deadline passed while it ran",
                         seconds=round(time.perf_counter() - start, 2))
            raise
        except Exception as exc:  # a CUDA error, a package that cannot load: recorded, and the run goes on
            entry.update(status="failed", note=one_line(exc))
            self.failed = True
        entry["seconds"] = round(time.perf_counter() - start, 2)
        if kind is not None and entry["status"] == "ok":
            self.learned[kind] = entry["seconds"]
        self.record["current"] = None
        self._log(entry)
        self.write()
        return entry["status"], result

    def _log(self, entry: dict) -> None:
        took = "" if entry["seconds"] is None else f" ({entry['seconds']:.1f} s)"
        note = f": {entry['note']}" if entry["note"] else ""
        print(f"[{time.time() - self._started:6.1f} s] {entry['status']:<7} {entry['step']}{took}{note}", flush=True)

    def write(self, status: str | None = None) -> None:
        from twins_deploy.files import atomic_output

        if status:
            self.record["status"] = status
        self.record["elapsed_s"] = round(time.time() - self._started, 1)
        with atomic_output(self.out / "gpu-run.json") as tmp:
            tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        with atomic_output(self.out / "gpu-run.md") as tmp:
            tmp.write_text(render_markdown(self.record))


# ----------------------------------------------------------------------------------------------
# The steps


def free_device() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a CUDA error left the context unusable: the next step records it
            pass


def runner(factory, plan: Plan, precision: str, mode: str, device: str | None = None):
    """A torch engine of the project (engines/torch_backend.py) for one precision and mode."""
    from twins_deploy.engines.torch_backend import TorchRunner

    base = "torch" if precision == "fp32" else f"torch-{precision}"
    return TorchRunner(factory, device=device or plan.device, precision=precision, compile=mode == "compile",
                       compile_backend=plan.compile_backend, cuda_graph=mode == "cuda-graph",
                       name=base if mode == "eager" else f"{base} {mode}")


def verify_model(run: Run, label: str, factory) -> None:
    """fp16 and bf16 against fp32 on the run's device; on CUDA, fp32 against the CPU too."""
    from twins_deploy.engines.verify import verification_inputs, verify

    plan = run.plan
    reference = runner(factory, plan, "fp32", "eager")
    status, _ = run.step(f"verify {label}: load the fp32 reference", reference.activate, 30)
    if status != "ok":
        return
    try:
        inputs, source = verification_inputs(reference.describe().metadata, None, plan.verify_samples)
        pairs = [(runner(factory, plan, precision, "eager"), reference) for precision in ("fp16", "bf16")]
        if plan.device == "cuda":
            pairs.append((reference, runner(factory, plan, "fp32", "eager", device="cpu")))
        for candidate, against in pairs:
            what = f"{candidate.precision} {candidate.device} vs {against.precision} {against.device}"

            def check(candidate=candidate, against=against, what=what) -> None:
                for engine in (candidate, against):
                    engine.activate()
                report = verify(candidate, against, inputs, source=source, trained=False)
                run.record["verify"].append({"model": label, "comparison": what, **report.as_dict()})

            run.step(f"verify {label}: {what}", check, 30)
            for engine in (candidate, against):
                if engine is not reference:
                    engine.deactivate()
    finally:
        reference.deactivate()
        free_device()


def bench_modes(run: Run, label: str, factory, precision: str, modes: tuple[str, ...], phase: str) -> None:
    """Bench ``modes`` of one precision together at every batch size, in interleaved rounds; ratios
    against the first mode (eager). A mode that fails once is not tried again at larger batches."""
    from twins_deploy.engines.bench import bench

    plan = run.plan
    if "compile" in modes:
        import torch

        # every model and precision compiles the same forward: without a reset its cache entries pile
        # up, and past torch's recompile limit a "compiled" engine would quietly run eager
        torch._dynamo.reset()
    engines = {mode: runner(factory, plan, precision, mode) for mode in modes}
    broken: dict[str, str] = {}

    def bench_row(mode: str, batch: int, status: str, note: str = "", figures: dict | None = None) -> dict:
        return {**(figures or {}), "model": label, "phase": phase, "precision": precision, "mode": mode,
                "batch": batch, "status": status, "note": note}

    def measure(batch: int) -> None:
        live, first_call = {}, {}
        for mode, engine in engines.items():
            if mode in broken:
                run.record["bench"].append(bench_row(mode, batch, "skipped", f"failed earlier: {broken[mode]}"))
                continue
            try:  # the first call compiles, captures the graph or picks kernels: timed apart
                engine.activate()
                shape = engine.describe().input_shape[1:]
                start = time.perf_counter()
                engine.infer(np.zeros((batch, *shape), np.float32))
                first_call[mode] = time.perf_counter() - start
                live[mode] = engine
            except Exception as exc:
                broken[mode] = one_line(exc)
                run.failed = True
                run.record["bench"].append(bench_row(mode, batch, "failed", broken[mode]))
        if not live:
            return
        rows = bench(list(live.values()), [batch], warmup=plan.warmup, seconds=plan.bench_seconds, rounds=plan.rounds)
        against_eager = next(iter(live)) == "eager"
        for (mode, engine), row in zip(live.items(), rows):
            figures = row.as_dict()
            if not against_eager:
                figures.update(speedup_vs_first=None, speedup_min=None, speedup_max=None)
            compute = figures.get("gpu_compute_ms_p50")
            figures["gpu_throughput_img_per_s"] = batch * 1e3 / compute if compute else None
            figures["first_call_s"] = round(first_call[mode], 3)
            run.record["bench"].append(bench_row(mode, batch, "ok", figures=figures))

    try:
        for index, batch in enumerate(plan.batches):
            if "compile" in broken:  # eager alone was measured in the first phase
                note = f"failed earlier: {broken['compile']}"
                run.record["bench"].append(bench_row("compile", batch, "skipped", note))
                continue
            estimate = len(modes) * (plan.bench_seconds + 2.0)
            if "compile" in modes and index < 2:  # a compile, then a recompile with a dynamic batch
                estimate += FIRST_COMPILE_S
            status, _ = run.step(f"bench {label} {precision} {' + '.join(modes)}, batch {batch}",
                                 lambda batch=batch: measure(batch), estimate, kind=f"{phase} batch {batch}")
            if status == "skipped":
                note = run.record["steps"][-1]["note"]
                run.record["bench"] += [bench_row(mode, batch, "skipped", note) for mode in modes]
    finally:
        for engine in engines.values():
            engine.deactivate()
        free_device()


def export_model(label: str, factory) -> dict:
    """The ONNX export (dynamic batch, verified on onnxruntime CPU) into a temporary folder, timed."""
    from twins_deploy.exporters import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        report = export_onnx(factory(), Path(folder) / f"{label}.onnx", batch="dynamic")
        wall = time.perf_counter() - start
    summary = report.as_dict()
    rows = summary["parity"]
    return {"model": label, "wall_s": round(wall, 2), "export_s": summary["seconds"], "passed": report.passed,
            "num_nodes": summary["num_nodes"], "file_bytes": summary["file_bytes"], "opset": summary["opset"],
            "max_abs": max(row["max_abs"] for row in rows), "max_rel": max(row["max_rel"] for row in rows),
            "cosine": min(row["cosine"] for row in rows), "parity": rows}


def describe(run: Run) -> None:
    import torch

    from twins_deploy.engines.bench import describe_machine

    machine = describe_machine()
    machine["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    if torch.cuda.is_available():
        machine["gpu"]["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    run.record["machine"] = machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu-run.json and gpu-run.md")
    parser.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time, from --started")
    parser.add_argument("--started", type=float, default=None, help="when the run began (epoch s; default now)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU stand-in: a tiny model, one batch size")
    parser.add_argument("--install", default="not run", help="what the install step did, for the report")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    plan = dry_run_plan() if args.dry_run else gpu_plan()
    run = Run(args.out, args.started or time.time(), args.budget_s, plan, args.dry_run, args.install)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(max(1, int(run.left()) + GRACE_S))
    try:
        run_steps(run)
    except OutOfTime:
        run.record["current"] = None
        run.write("stopped at the deadline")
        print("stopped at the deadline", flush=True)
        return 1
    finally:
        signal.alarm(0)
    run.write("finished")
    print(f"wrote {args.out / 'gpu-run.json'} and {args.out / 'gpu-run.md'}", flush=True)
    return 1 if run.failed else 0


def run_steps(run: Run) -> None:
    """Every step, in the order that keeps the most figures when the clock runs out."""
    plan = run.plan
    run.record["nvidia_smi"] = nvidia_smi()
    run.record["packages"] = probe_packages()
    run.write()
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    run.step("describe the machine", lambda: describe(run), 30)
    if plan.device == "cuda" and not torch.cuda.is_available():
        run.step("find the GPU", _no_gpu, 0)
        return

    from twins_deploy.models import create_model

    factories = {}
    for label, (name, config) in plan.models.items():
        def build(name=name, config=config):
            return create_model(name, weights="random", config=config)

        status, model = run.step(f"build {label} (seeded random weights)", build, 30)
        if status == "ok":
            factories[label] = lambda model=model: copy.deepcopy(model)  # each engine moves its own copy
    for label, factory in factories.items():
        verify_model(run, label, factory)
    fast = ("eager", "cuda-graph") if plan.device == "cuda" else ("eager",)
    for label, factory in factories.items():
        for precision in PRECISIONS:
            bench_modes(run, label, factory, precision, fast, phase="bench")
            if "cuda-graph" not in fast:
                run.record["bench"] += [{"model": label, "phase": "bench", "precision": precision, "mode": "cuda-graph",
                                         "batch": batch, "status": "skipped",
                                         "note": "not offered: CUDA graphs need a CUDA device"}
                                        for batch in plan.batches]
    for label, factory in factories.items():
        run.step(f"export {label} to ONNX and verify it", lambda label=label, factory=factory:
                 run.record["export"].append(export_model(label, factory)), 90, kind="export")
    for precision in COMPILE_ORDER:
        for label, factory in factories.items():
            bench_modes(run, label, factory, precision, ("eager", "compile"), phase="compile")


def _no_gpu() -> None:
    raise RuntimeError("torch sees no CUDA GPU (torch.cuda.is_available() is False): nothing to measure")


# ----------------------------------------------------------------------------------------------
# The Markdown report


def _figure(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fastest(rows: list[dict]) -> dict:
    """Per model, the highest throughput measured (device time where there is one) and its row."""
    best = {}
    for row in rows:
        if row["status"] == "ok":
            rate = row["gpu_throughput_img_per_s"] or row["throughput_img_per_s"]
            if rate > best.get(row["model"], (0.0, None))[0]:
                best[row["model"]] = (rate, row)
    return best


def render_markdown(record: dict) -> str:
    """The report as Markdown: the machine, then one table per kind of step, then every step's status."""
    smi, machine = record.get("nvidia_smi") or {}, record.get("machine") or {}
    libraries = machine.get("libraries", {})
    gpu = machine.get("gpu") or {}
    where = smi.get("name") or gpu.get("name") or "no GPU"
    title = "CPU dry run" if record["dry_run"] else where
    lines = [f"# twins-deploy GPU run: {title}", ""]
    lines += [f"- status: **{record['status']}**" + (f" (running: {record['current']})" if record["current"] else "")
              + f", {record['elapsed_s']:.0f} s of a {record['budget_s']:.0f} s budget, started {record['started']}",
              f"- GPU: {where}; driver {smi.get('driver_version', '-')}; memory {smi.get('memory.total', '-')}; "
              f"compute capability {gpu.get('compute_capability', '-')}; CUDA {gpu.get('cuda', '-')}",
              f"- CPU: {machine.get('cpu', '-')}, {machine.get('cpu_threads', '-')} threads; "
              f"Python {machine.get('python', '-')}",
              f"- versions: " + ", ".join(f"{name} {version}" for name, version in libraries.items()),
              f"- install: {record['install']}",
              f"- settings: {record['settings']['device']}, batches {record['settings']['batches']}, "
              f"{record['settings']['bench_seconds_per_engine']} s per engine and batch in "
              f"{record['settings']['rounds']} interleaved rounds, torch.compile backend "
              f"{record['settings']['compile_backend']}, TF32 off, seeded random weights"]
    for model, (rate, row) in fastest(record["bench"]).items():
        timed = "device time" if row["gpu_compute_ms_p50"] else "end to end"
        lines.append(f"- fastest {model}: **{rate:,.0f} img/s** ({timed}, {row['precision']} {row['mode']}, "
                     f"batch {row['batch']})")
    lines.append("")
    lines += ["## Packages", "", "| package | version or error |", "|---|---|"]
    for name, found in record["packages"].items():
        lines.append(f"| {name} | {found['version'] if found['loaded'] else 'cannot load: ' + found['error']} |")
    lines += ["", f"## Verify: torch fp16 and bf16 against fp32 ({record['settings']['verify_samples']} seeded "
              "synthetic images)", "",
              "| model | comparison | max abs | max rel | lowest cosine | top-1 | top-5 | within limits |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in record["verify"]:
        parity = row["parity"]
        top1, top5 = parity["top1_agreement"], parity["top5_agreement"]
        lines.append(f"| {row['model']} | {row['comparison']} | {parity['max_abs']:.2e} | {parity['max_rel']:.2e} | "
                     f"{parity['cosine']:.6f} | {'-' if top1 is None else f'{top1:.1%}'} | "
                     f"{'-' if top5 is None else f'{top5:.1%}'} | {'yes' if row['passed'] else 'no'} |")
    lines += ["", "## Bench: torch engines", "",
              "End to end: a host array in, host arrays out (the host-device copies included). Device: CUDA events "
              "around the model alone. `vs eager`: median over rounds of eager's p50 / this one's, with its range, "
              "eager measured in the same rounds.", "",
              "| model | precision | mode | batch | p50 ms | device p50 ms | img/s | device img/s | vs eager | "
              "first call s | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in record["bench"]:
        if row["phase"] == "compile" and row["mode"] == "eager":  # the reference of the compile ratios
            continue
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['precision']} | {row['mode']} | {row['batch']} | "
                         f"- | - | - | - | - | - | {row['status']}: {row['note']} |")
            continue
        ratio = ("-" if row["speedup_vs_first"] is None or row["mode"] == "eager" else
                 f"{row['speedup_vs_first']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})")
        lines.append(f"| {row['model']} | {row['precision']} | {row['mode']} | {row['batch']} | "
                     f"{row['latency_ms_p50']:.3f} | {_figure(row['gpu_compute_ms_p50'], 3)} | "
                     f"{_figure(row['throughput_img_per_s'])} | {_figure(row['gpu_throughput_img_per_s'])} | {ratio} | "
                     f"{row['first_call_s']:.2f} | |")
    lines += ["", "## ONNX export on this machine (dynamic batch, verified on onnxruntime CPU at batch 1 and 3)", "",
              "| model | seconds | nodes | MB | max abs | max rel | lowest cosine | passed |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in record["export"]:
        lines.append(f"| {row['model']} | {row['wall_s']:.1f} | {row['num_nodes']} | "
                     f"{row['file_bytes'] / 1e6:.1f} | {row['max_abs']:.2e} | {row['max_rel']:.2e} | "
                     f"{row['cosine']:.6f} | {'yes' if row['passed'] else 'no'} |")
    lines += ["", "## Steps", "", "| step | status | seconds | note |", "|---|---|---:|---|"]
    for step in record["steps"]:
        lines.append(f"| {step['step']} | {step['status']} | {_figure(step['seconds'])} | {step['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
