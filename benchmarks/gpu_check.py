"""Every GPU path end to end in one command: ``python benchmarks/gpu_check.py`` (``make gpu-check``).

On a CUDA machine, in order, within a wall-clock budget (default 8 minutes):

1. ``pytest -m cuda``: nvjpeg JPEG against the CPU codec, bf16 + channels-last training steps through Lightning,
   AutoAttack on the GPU (tests/test_gpu.py; figures from their junit properties);
2. ``benchmarks/run.py --device cuda``: the speed ratios, bf16 and channels-last included (its JSON last line);
3. one epoch of ``configs/cifar10_fast.yaml`` on the shared CIFAR-10 subset (``$ROBUST_DATA/cifar10-subset``,
   default ``../shared/data``), validation limited to a few batches; ``val/*`` read from its TensorBoard events.

Prints one table (step, status, seconds, key figures), then one JSON line (also ``--out``/gpu_check.json, beside
each step's full output). Exits 1 if a step failed, timed out or was not reached. Without CUDA it says so in one
line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "gpu-check: no CUDA device here; nothing to check"
BUDGET_S = 8 * 60
PYTEST, BENCH, TRAIN = "pytest -m cuda", "benchmarks/run.py --device cuda", "cifar10_fast, 1 epoch"
VAL_BATCHES = 4
BENCH_KEYS = (
    "fgsm_step_over_clean_step",
    "fgsm_step_over_clean_step_bf16_channels_last",
    "pgd_over_torchattacks",
    "pgd_over_torchattacks_bf16_channels_last",
    "jpeg_batched_over_pil",
    "jpeg_batched_over_pil_224",
)
VAL_FIGURES = ("val/clean", "val/fgsm", "val/pgd", "val/jpeg_pgd", "val/bpda_pgd")


@dataclass
class Step:
    """One step's outcome: ``status`` is ok, failed, timeout or not run; ``note`` says why when it is not ok."""

    name: str
    status: str
    seconds: float = 0.0
    figures: dict[str, float | int | str] = field(default_factory=dict)
    note: str = ""


def format_figures(step: Step) -> str:
    values = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in step.figures.items()]
    return ", ".join(([step.note] if step.note else []) + values)


def format_table(steps: list[Step]) -> str:
    """The summary: one aligned row per step (name, status, wall seconds, note and key figures)."""
    head = ("step", "status", "seconds", "key figures")
    rows = [(s.name, s.status, f"{s.seconds:.1f}", format_figures(s)) for s in steps]
    name_w, status_w, sec_w = (max(len(r[i]) for r in [head, *rows]) for i in range(3))
    lines = [f"{a:<{name_w}}  {b:<{status_w}}  {c:>{sec_w}}  {d}".rstrip() for a, b, c, d in [head, *rows]]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def run_command(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run ``cmd`` in the project root, output to ``log``: (exit code, or None when it ran past ``timeout``; s)."""
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = code.returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, time.perf_counter() - start


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def pytest_figures(junit: Path) -> tuple[dict, str]:
    """Counts and recorded properties from a pytest junit file; a note unless every test passed (a skipped GPU
    test is a path left unchecked)."""
    suites = list(ET.parse(junit).getroot().iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = count["failures"] + count["errors"]
    figures: dict = {
        "passed": count["tests"] - failed - count["skipped"],
        "failed": failed,
        "skipped": count["skipped"],
    }
    for prop in ET.parse(junit).getroot().iter("property"):
        figures[prop.get("name")] = _number(prop.get("value", ""))
    note = "" if failed == 0 and count["skipped"] == 0 and figures["passed"] > 0 else "not all tests passed"
    return figures, note


def last_json_line(log: Path) -> dict:
    lines = log.read_text().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def scalars(log_dir: Path, prefix: str = "val/") -> dict[str, float]:
    """The last value of every TensorBoard scalar under ``prefix`` in the newest run below ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted({p.parent for p in log_dir.rglob("events.out.tfevents.*")}, key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    events = EventAccumulator(str(runs[-1]))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith(prefix)}


def train_command(data_root: Path, log_dir: Path) -> list[str]:
    """One epoch of the fast CIFAR-10 recipe (bf16, channels-last) on the image-folder subset, on the GPU."""
    return [
        sys.executable,
        "train.py",
        "fit",
        "--config",
        "configs/cifar10_fast.yaml",
        "--data.class_path",
        "robust.data.modules.ImageFolder",
        "--data.init_args.root",
        str(data_root),
        "--trainer.accelerator",
        "gpu",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        str(VAL_BATCHES),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(log_dir),
    ]


def run_steps(out: Path, budget: float, env: dict[str, str]) -> list[Step]:
    """The three steps in order, each given what is left of ``budget`` (a step it does not reach is 'not run');
    each step's output goes to ``out``."""
    start = time.perf_counter()
    data_root = Path(env["ROBUST_DATA"]) / "cifar10-subset"
    junit = out / "pytest.xml"
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        plan = {
            PYTEST: (
                "pytest.log",
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-m",
                    "cuda",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-o",
                    "junit_family=xunit1",
                    f"--junitxml={junit}",
                    "--continue-on-collection-errors",
                    "tests",
                ],
            ),
            BENCH: ("bench.log", [sys.executable, "benchmarks/run.py", "--device", "cuda"]),
            TRAIN: ("train.log", train_command(data_root, Path(tmp))),
        }
        for name, (log_name, cmd) in plan.items():
            left = budget - (time.perf_counter() - start)
            if left < 1:
                steps.append(Step(name, "not run", note="budget spent"))
                continue
            if name == TRAIN and not (data_root / "train").is_dir():
                steps.append(Step(name, "failed", note=f"no CIFAR-10 subset at {data_root} (set ROBUST_DATA)"))
                continue
            print(f"gpu-check: {name} ...", flush=True)
            log = out / log_name
            rc, seconds = run_command(cmd, log, left, env)
            try:
                figures, note = figures_of(name, log, junit, Path(tmp))
            except (OSError, ValueError, ET.ParseError) as exc:
                figures, note = {}, f"no figures ({type(exc).__name__})"
            if rc is None:
                status, note = "timeout", f"stopped at the budget after {seconds:.0f} s"
            elif rc != 0 or note:
                status, note = "failed", ", ".join(n for n in (f"exit {rc}" if rc else "", note) if n)
            else:
                status = "ok"
            if status != "ok":
                print(f"--- {name}: last lines of {log} ---\n" + "\n".join(log.read_text().splitlines()[-25:]))
            steps.append(Step(name, status, seconds, figures, note))
    return steps


def figures_of(name: str, log: Path, junit: Path, log_dir: Path) -> tuple[dict, str]:
    """A step's key figures, and a note when they show a failure."""
    if name == PYTEST:
        return pytest_figures(junit)
    if name == BENCH:
        record = last_json_line(log)
        figures = {k: round(record[k], 2) for k in BENCH_KEYS if k in record}
        return figures, "" if len(figures) == len(BENCH_KEYS) else "ratios missing from the JSON line"
    values = scalars(log_dir)
    figures = {k.removeprefix("val/"): round(values[k], 3) for k in VAL_FIGURES if k in values}
    return figures, "" if len(figures) == len(VAL_FIGURES) else "val/* metrics missing from the TensorBoard events"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"wall-clock seconds for all steps ({BUDGET_S})")
    p.add_argument("--out", default="runs/gpu-check", help="folder for each step's output and gpu_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    from robust.data.roots import shared_data_dir

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The project root on PYTHONPATH: benchmarks/run.py imports robust where the project is not installed.
    python_path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env = {
        **os.environ,
        "ROBUST_DATA": str(shared_data_dir().resolve()),
        "ROBUST_REQUIRE_SHARED_DATA": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": python_path,
    }
    start = time.perf_counter()
    steps = run_steps(out, args.budget, env)
    record = {
        "ok": all(s.status == "ok" for s in steps),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "budget_s": args.budget,
        "seconds": round(time.perf_counter() - start, 1),
        "steps": [asdict(s) | {"seconds": round(s.seconds, 1)} for s in steps],
    }
    print(format_table(steps))
    line = json.dumps(record)
    (out / "gpu_check.json").write_text(line + "\n")
    print(line)
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
