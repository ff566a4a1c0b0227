"""Smoke test of ``benchmarks/run.py``: every benchmark runs once on tiny sizes (no timing assertions; the timer
is checked on a fake clock)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust.errors import RobustError
from robust.threats import DEFAULT_THREATS

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is a script folder, not a package)."""
    module = f"bench_{name}"
    if module not in sys.modules:
        spec = importlib.util.spec_from_file_location(module, ROOT / "benchmarks" / f"{name}.py")
        sys.modules[module] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[module])
    return sys.modules[module]


@pytest.mark.slow  # every benchmark in a fresh process
def test_quick_run_prints_table_and_json_with_every_ratio(tmp_path):
    """All benchmarks, with the bf16 / channels_last variants (the GPU fast paths, here on CPU autocast)."""
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "benchmarks/run.py",
        "--quick",
        "--device",
        "cpu",
        "--fast-paths",
        "--threads",
        "1",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    assert json.loads(out.read_text()) == record
    assert lines[0].split()[:3] == ["benchmark", "variant", "ms/batch"]
    assert any(line.startswith("PGD-2 attack, torchattacks") for line in lines)
    ratios = [
        "fgsm_step_over_clean_step",
        "fgsm_half_step_over_clean_step",
        "pgd2_step_over_clean_step",
        "pgd_over_torchattacks",
        "jpeg_batched_over_pil",
        "jpeg_batched_over_pil_224",
    ]
    for suffix in ("", "_channels_last", "_bf16", "_bf16_channels_last"):
        ratios += [f"fgsm_step_over_clean_step{suffix}", f"pgd_over_torchattacks{suffix}"]
    for key in ratios:
        assert math.isfinite(record[key]) and record[key] > 0, key
    assert record["jpeg_batched_over_pil_pixels_identical"] and record["jpeg_batched_over_pil_224_pixels_identical"]
    assert "capability" in record["device"] and "GPU" not in record["device"]
    assert record["torch"] == torch.__version__ and record["threads"] == 1
    assert record["batch"] == 2 and len(record["images_per_s"]) == 4 * 6 + 4


def test_time_interleaved_takes_medians_after_warmup(monkeypatch):
    """On a fake clock that each call advances by its own scripted duration: the figures are the medians of the
    timed rounds, warm-up rounds left out, whatever the machine's speed or load."""
    timing = load_script("timing")
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    durations = {"fast": [9.0, 9.0, 0.003, 0.001, 0.002], "slow": [9.0, 9.0, 0.02, 0.05, 0.03]}  # 2 warm-up rounds
    calls = {"fast": 0, "slow": 0}

    def call(name: str):
        def fn() -> None:
            now[0] += durations[name][calls[name]]
            calls[name] += 1

        return fn

    t = timing.time_interleaved({"fast": call("fast"), "slow": call("slow")}, repeats=3, warmup=2, sync=lambda: None)
    assert calls == {"fast": 5, "slow": 5}
    assert t == pytest.approx({"fast": 0.002, "slow": 0.03})


def test_sample_images_are_real_photos_in_range():
    run = load_script("run")
    x, source = run.sample_images(3, 64, seed=0)
    assert x.shape == (3, 3, 64, 64) and 0 <= x.min() and x.max() <= 1 and "photos" in source
    assert x.std() > 0.05  # real picture content, not a constant
    assert torch.equal(x, run.sample_images(3, 64, seed=0)[0])


def test_the_floor_benchmark_gives_every_model_its_rows_and_ratios():
    """``--only floor`` on tiny sizes, one thread (no timing asserted): four rows and five ratios per model."""
    run = load_script("run")  # puts the repository on sys.path, so benchmarks.* import
    from benchmarks.floor import MODELS, bench_floor
    from benchmarks.timing import QUICK

    timing = {"repeats": 1, "warmup": 0, "sync": lambda: None}
    rows, keys = bench_floor(torch.device("cpu"), QUICK, timing, lambda n, s: run.sample_images(n, s, 0)[0], (1,))
    assert len(rows) == 4 * len(MODELS)
    for model in MODELS:
        for key in ("pgd_fast_over_torchattacks", "pgd_fast_over_plain", "step_over_floor", "forward_fast_over_plain"):
            assert keys[f"{model.name}_t1_{key}"] > 0


@pytest.mark.parametrize(
    "argv, match",
    [(["--repeats", "0"], "at least"), (["--threads", "0"], "at least"), (["--device", "cuda"], "CUDA")],
)
def test_bad_options_are_clear_errors(argv, match):
    if argv[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RobustError, match=match):
        load_script("run").main(argv)


@pytest.mark.slow  # the benchmark script end to end, AutoAttack included; test_early_exit.py checks the property
def test_quick_suite_row_never_reports_higher_accuracy_with_early_exit(tmp_path):
    """``--only suite autoattack --quick``: the threat suite with early exit and with the cascade, side by side with
    every example every step, on stand-in digits models (and the authors' MNIST model, when
    ``.cache/fast_adversarial/fgsm.pth`` and MNIST are there), then the cheap worst cases beside AutoAttack (cut
    down). Whatever the timings, on the same images and seeds no accuracy may be higher than the all-steps run's
    (the targeted success rate no lower), the clean figures are equal, and the cascade's worst cases equal the
    early-exit run's (the same attacks, run on survivors)."""
    run = load_script("run")
    out = tmp_path / "suite.json"
    record = run.main(
        ["--quick", "--only", "suite", "autoattack", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    cases = [k.removesuffix("_accuracy") for k in record if k.startswith("suite_") and k.endswith("_accuracy")]
    assert {"suite_digits", "suite_digits_clean"} <= set(cases)
    for case in cases:
        acc = record[f"{case}_accuracy"]
        full = acc["all_steps"]
        assert set(full) == set(DEFAULT_THREATS)
        for mode in ("early_exit", "cascade"):
            for key, value in acc[mode].items():
                if key == "targeted_success":
                    assert value >= full[key], (case, mode, key)
                else:
                    assert value <= full[key], (case, mode, key)
            assert acc[mode]["clean"] == full["clean"] and acc[mode]["jpeg"] == full["jpeg"]
        for key in ("pgd_worst", "jpeg_worst"):
            assert acc["cascade"][key] == acc["early_exit"][key], (case, key)
        assert record[f"{case}_never_higher"] is True
        for mode in ("early_exit", "cascade"):
            ratio = record[f"{case}_{mode}_over_all_steps"]
            assert math.isfinite(ratio) and ratio > 0
    for key in ("digits", "mnist"):
        if f"suite_{key}" not in cases:
            continue
        acc = record[f"{key}_cheap_vs_autoattack_accuracy"]
        assert set(acc) == {
            "cheap",
            "cheap_cascade_apgd100",
            "cheap_cascade_square",
            "autoattack",
            "worst_of_cheap_and_autoattack",
        }
        assert acc["worst_of_cheap_and_autoattack"] <= min(acc["cheap"], acc["autoattack"])
        assert acc["cheap_cascade_square"] <= acc["cheap"]  # the same attacks on survivors, then Square
        assert math.isfinite(record[f"{key}_cheap_over_autoattack"]) and record[f"{key}_cheap_vs_autoattack_n"] == 4
    assert record["suite_repeats"] == 1 and record["threads"] == 1


@pytest.mark.slow  # AutoAttack (cut down) through the report and through torchattacks, on MNIST
def test_the_report_benchmark_times_both_sides_on_the_same_images(shared_data, tmp_path):
    """``--only report --quick``: the report with AutoAttack and torchattacks' AutoAttack, in one batch and in the
    report's batches, on the same 4 MNIST test images (the authors' fgsm.pth when it is there, else a stand-in):
    three timings, their ratios, and three AutoAttack figures that are fractions of the 4 images."""
    record = load_script("run").main(
        ["--quick", "--only", "report", "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "r.json")]
    )
    assert set(record["report_autoattack_seconds"]) == {"report", "torchattacks", "torchattacks_batched"}
    assert all(t > 0 for t in record["report_autoattack_seconds"].values())
    for key in ("report_autoattack_over_torchattacks", "report_autoattack_over_torchattacks_batched"):
        assert math.isfinite(record[key]) and record[key] > 0
    assert record["report_autoattack_n"] == 4 and record["report_autoattack_batch"] == 2
    accuracy = record["report_autoattack_accuracy"]
    assert set(accuracy) == set(record["report_autoattack_seconds"])
    assert all(4 * a == round(4 * a) and 0 <= a <= 1 for a in accuracy.values())
