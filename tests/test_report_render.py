"""report.md, the curve and the honesty flags as a reader meets them: structure, not pixels (robust.evaluation.render,
on a
report dict; no model needed)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from robust.evaluation.render import CURVE_STYLE, FLAG_RULE, curve_png, honesty_flags, markdown_table, threat_names

ROW = {
    "clean": 0.992,
    "fgsm": 0.806,
    "pgd": 0.661,
    "apgd": 0.60,
    "pgd_worst": 0.60,
    "jpeg": 0.981,
    "jpeg_fgsm": 0.80,
    "jpeg_pgd": 0.678,
    "bpda_pgd": 0.669,
    "jpeg_worst": 0.65,
    "targeted_success": 0.2,
}


def make_report(autoattack: bool = False, n: int = 360, **change) -> dict:
    rows = []
    for eps in (0.1, 8 / 255):
        row = {"eps": eps, "alpha": eps / 4, **ROW, **change}
        if autoattack:
            row["autoattack"] = 0.58
        rows.append(row)
    return {
        "rows": rows,
        "flags": honesty_flags(rows, n),
        "n": n,
        "steps": 10,
        "restarts": 1,
        "quality": 75,
        "seed": 0,
        "model": {"spec": "lightning_logs/digits/best.ckpt", "arch": "resnet18"},
        "data": {"name": "digits", "split": "val"},
    }


def tables(markdown: str) -> list[list[str]]:
    return [block.splitlines() for block in markdown.split("\n\n") if block.startswith("| ε")]


def test_report_md_starts_with_what_was_measured_then_what_to_claim():
    md = markdown_table(make_report())
    heading = md.splitlines()[0]
    assert heading == (
        "# Robustness of `best.ckpt` (resnet18) on 360 images of digits (val split): L∞ attacks at "
        "ε 0.1, 0.03137 (8/255)"
    )
    claim, per_attack = tables(md)
    assert claim[0] == "| ε (L∞) | Clean | Worst case (FGSM, PGD, APGD-CE, -DLR, -T) | JPEG q75 worst case |"
    assert claim[2] == "| 0.1 | 99.2 | 60.0 | 65.0 |" and len(claim) == 2 + 2
    names = threat_names(make_report())
    keys = ("fgsm", "pgd", "apgd", "jpeg", "jpeg_fgsm", "jpeg_pgd", "bpda_pgd", "targeted_success")
    others = [names[k] for k in keys]
    assert per_attack[0] == "| ε (L∞) | " + " | ".join(others) + " |"
    assert md.index("Worst case") < md.index("| ε (L∞) | FGSM")  # the compact table comes first
    # no warning fired: none announced, and a model that has learned carries no "Not learned"
    assert FLAG_RULE not in md and "Warnings below" not in md and "**Warning:**" not in md
    assert "Not learned" not in md


def test_autoattack_joins_the_compact_table_when_it_ran():
    md = markdown_table(make_report(autoattack=True))
    claim, per_attack = tables(md)
    assert claim[0].endswith("| JPEG q75 worst case | AutoAttack |") and "AutoAttack" not in per_attack[0]
    assert "The cheap worst case minus AutoAttack, in points: +2.0 at eps 0.1" in md


def test_flags_fire_only_beyond_sampling_noise_and_count_the_images():
    # The case: bpda_pgd 0.27 points above jpeg_pgd on 360 images (one image) is noise.
    assert honesty_flags([{"eps": 0.1, **ROW, "bpda_pgd": 0.678 + 1 / 360}], 360) == []
    # 5 points (18 of 360 images) is under 1.96 binomial standard errors (~6.9 points) here: still noise...
    assert honesty_flags([{"eps": 0.1, **ROW, "pgd": 0.856}], 360) == []
    # ...but not on 10,000 images, where one standard error is ~0.6 points
    [flag] = honesty_flags([{"eps": 0.1, **ROW, "pgd": 0.856}], 10_000)
    assert "PGD accuracy 85.60% is above FGSM 80.60% (5.0 points, 500 of 10000 images)" in flag
    # A large gap on few images: 20 points on 360 images
    [flag] = honesty_flags([{"eps": 0.1, **ROW, "bpda_pgd": 0.878}], 360)
    assert "(20.0 points, 72 of 360 images)" in flag and "jpeg_worst 65.00%" in flag
    # Never on fewer than 6 images, whatever the proportions
    assert honesty_flags([{"eps": 0.1, **ROW, "pgd": 0.806 + 5 / 40, "fgsm": 0.806}], 40) == []
    # The flag reaches report.md with its count
    md = markdown_table(make_report(n=10_000, pgd=0.856))
    assert md.count("**Warning:**") == 2 and "500 of 10000 images" in md and FLAG_RULE in md


def test_every_threat_has_its_own_look():
    looks = list(CURVE_STYLE.values())
    assert len(set(looks)) == len(looks)
    assert len({color for color, _, _ in looks}) == len(looks)


@pytest.mark.parametrize("autoattack", [False, True])
def test_the_curve_is_a_png_with_an_accuracy_panel_and_a_success_panel(autoattack):
    png = curve_png(make_report(autoattack=autoattack))
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.size == (1320, 720)
        rgb = img.convert("RGB")
        # targeted success (pink, its own panel on the right) is drawn right of the accuracy panel's last x
        pink = (227, 119, 194)
        xs = [x for x in range(rgb.width) for y in range(0, int(rgb.height * 0.8), 3) if rgb.getpixel((x, y)) == pink]
        assert xs and min(xs) > rgb.width * 0.7


def test_a_folder_of_splits_is_one_line_naming_the_split_to_pass(tmp_path):
    from types import SimpleNamespace

    from robust.data.eval_data import eval_data
    from robust.errors import RobustError

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / cls / "0.png")
    card = SimpleNamespace(image_size=8, resize=8, channels=3, class_names=["cat", "dog"])
    with pytest.raises(RobustError) as caught:
        eval_data(str(tmp_path), card)
    assert str(caught.value) == (
        f"{tmp_path} holds the splits test, train, not class folders: pass one split, e.g. "
        f"--data {tmp_path / 'test'} (the held-out images)"
    )
    _, identity = eval_data(str(tmp_path / "test"), card)
    assert identity["n"] == 2


def test_a_model_at_chance_is_flagged_under_the_heading():
    """The issue's case: 4 balanced classes, clean 0.20, the worst case 0.25 (a constant classifier's): the report
    says in one line that the model has not learned, and what to change."""
    from robust.learned import not_learned

    reason = not_learned(0.20, 4)
    assert reason and "within 10 points of chance (0.250 for 4 classes)" in reason
    assert not_learned(0.36, 4) is None and not_learned(0.34, 4) is not None
    assert "one class" in not_learned(0.9, 10, top_share=0.99) and not_learned(None, 4) is None
    md = markdown_table({**make_report(), "not_learned": reason})
    [line] = [line for line in md.splitlines() if line.startswith("**Not learned:**")]
    assert md.splitlines().index(line) == 2 and "configs/imagefolder_finetune.yaml" in line
