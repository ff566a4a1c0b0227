"""Where evaluate.py report writes by default: a folder named after the run and the data it measured, never another
model's report overwritten silently (robust.cli_defaults)."""

from __future__ import annotations

import json
from pathlib import Path

from robust.cli_defaults import data_name, default_out, model_name, report_folder


def test_a_linked_checkpoint_is_named_by_its_real_file_and_run(tmp_path):
    run = tmp_path / "lightning_logs" / "pets" / "version_3" / "checkpoints"
    run.mkdir(parents=True)
    real = run / "best-epoch009-pgd_worst0.4100.ckpt"
    real.write_bytes(b"")
    (tmp_path / "lightning_logs" / "pets" / "best.ckpt").symlink_to(real)
    assert model_name(str(tmp_path / "lightning_logs" / "pets" / "best.ckpt")) == (
        "pets-version_3-best-epoch009-pgd_worst0.4100"
    )
    assert model_name("hf:org/vit-base") == "vit-base" and model_name("imagenet") == "imagenet"
    pets = tmp_path / "pets" / "test"
    pets.mkdir(parents=True)
    assert data_name(str(pets)) == "pets-test" and data_name("digits") == "digits"
    assert default_out(str(real), str(pets)) == Path("reports/pets-version_3-best-epoch009-pgd_worst0.4100-pets-test")


def test_another_models_report_is_never_overwritten_silently(tmp_path):
    out = tmp_path / "reports" / "best-digits"
    mine = {"spec": "best.ckpt", "path": "/runs/version_1/best.ckpt", "sha256": "aa"}
    assert report_folder(out, mine, chosen=False) == (out, None)  # nothing there yet
    out.mkdir(parents=True)
    other = {"spec": "best.ckpt", "path": "/runs/version_0/best.ckpt", "sha256": "bb"}
    (out / "report.json").write_text(json.dumps({"model": other}))
    folder, notice = report_folder(out, mine, chosen=False)
    assert folder == out.with_name("best-digits-2") and notice.startswith(f"report: {out} holds the report of ")
    assert report_folder(out, other, chosen=False) == (out, None)  # the same model again: its own report
    folder, notice = report_folder(out, mine, chosen=True)  # --out: the user's folder, replaced, saying so
    assert folder == out and notice == f"report: replacing the report of /runs/version_0/best.ckpt in {out}"
