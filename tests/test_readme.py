"""The README as a newcomer follows it: its size, its commands and its snippets.

Every ```bash / ```sh / ```python block of README.md runs, in order, in a copy of the project (its tracked and
untracked files, as a fresh clone after ``make setup`` has them), through stand-ins for what ``make setup`` provides:
``uv run X`` runs X from this test's interpreter's environment, ``make train`` runs the Makefile's recipe, the other
make targets (``test``, ``setup``...) and ``tensorboard`` (a server) are only checked, not run. Training and report
commands run as written with a few options added that make them take seconds (:data:`TRAIN_SHORT`,
:data:`REPORT_SHORT`; the README's own options come after them and win). Blocks after a
``<!-- readme-test: flags-only (why) -->`` line (GPUs, clusters, hours of training) are checked against their
script's ``--help`` instead: the script exists and every option they use is one of its options.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_BYTES = 13_000
BLOCK = re.compile(r"(?:<!-- readme-test: ([^>]*?) -->\n)?```(bash|sh|python)\n(.*?)```", re.DOTALL)
TRAIN_SHORT = [
    "--trainer.max_epochs",
    "1",
    "--data.init_args.limit",
    "64",
    "--data.init_args.image_size",
    "8",
    "--trainer.limit_val_batches",
    "1",
    "--model.val_steps",
    "2",
    "--overfit_guard.n",
    "8",
    "--overfit_guard.pgd_steps",
    "1",
    "--image_grid.n",
    "2",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
]
REPORT_SHORT = ["--limit", "16", "--steps", "2", "--batch-size", "8"]
NOT_RUN_MAKE_TARGETS = {"setup", "test", "test-all", "lint", "bench", "gpu-check", "tensorboard"}


def blocks() -> list[tuple[str, str, str | None]]:
    """``(language, code, readme-test marker or None)`` of every shell and Python block, in order."""
    return [(lang, code, marker) for marker, lang, code in BLOCK.findall(README.read_text())]


def commands(code: str) -> list[list[str]]:
    """The commands of a shell block, as argument lists (comments dropped, ``\\`` continuations joined)."""
    text = code.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if shlex.split(line, comments=True)]


def test_the_readme_fits_in_13000_bytes():
    size = len(README.read_bytes())
    assert size <= MAX_BYTES, f"README.md is {size} bytes; move measurement histories to docs/"


def test_every_command_runs_through_uv_or_make():
    """A bare ``python`` or ``tensorboard`` only works inside the venv; ``uv run`` and make targets work anywhere."""
    shell = [cmd for lang, code, _ in blocks() if lang != "python" for cmd in commands(code)]
    assert len(shell) >= 10
    for cmd in shell:
        words = [w for w in cmd if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)]  # VAR=value prefixes
        assert words[0] in ("uv", "make"), cmd
        if words[0] == "uv":
            assert words[1] == "run", cmd
        else:
            assert words[1] in NOT_RUN_MAKE_TARGETS | {"train"}, cmd


def test_links_to_docs_exist():
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)", README.read_text()):
        assert (ROOT / target).is_file(), target


@cache
def help_text(script: str, sub: str | None) -> str:
    """``python SCRIPT [SUB] --help``'s output, the script run in this process as ``__main__`` (argparse's help is the
    behaviour here, not a new interpreter's start-up)."""
    out = io.StringIO()
    with (
        mock.patch.object(sys, "argv", [script, *([sub] if sub else []), "--help"]),
        contextlib.redirect_stdout(out),
        pytest.raises(SystemExit) as stop,
    ):
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stop.value.code in (0, None), out.getvalue()[-2000:]
    return out.getvalue()


def test_flags_only_commands_use_real_options():
    """Commands the suite cannot run here (GPUs, a cluster, hours): their script exists and knows every option."""
    checked = 0
    for _, code, marker in blocks():
        if not (marker or "").startswith("flags-only"):
            continue
        for cmd in commands(code):
            at = next(i for i, w in enumerate(cmd) if w.endswith(".py"))
            script, rest = cmd[at], cmd[at + 1 :]
            assert (ROOT / script).is_file(), script
            sub = rest[0] if script in ("train.py", "evaluate.py") else None
            text = help_text(script, sub)
            for option in (w.split("=")[0] for w in rest if w.startswith("--")):
                assert re.search(rf"{re.escape(option)}\b", text), f"{script} {sub or ''}: no option {option}"
            checked += 1
    assert checked >= 2


# ---- running it ------------------------------------------------------------------------------------


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def stand_ins(bin_dir: Path) -> None:
    """``python``, ``uv``, ``make`` and ``tensorboard`` as ``make setup`` leaves them, made quick (see the module
    docstring)."""
    bin_dir.mkdir()
    _script(
        bin_dir / "python",
        f"""import os, sys
args = sys.argv[1:]
if args[:2] == ["train.py", "fit"] and "--help" not in args:
    at = args.index("--config") + 2 if "--config" in args else 2
    args = args[:at] + {TRAIN_SHORT!r} + args[at:]
elif args[:2] == ["evaluate.py", "report"]:
    args = args + {REPORT_SHORT!r}
os.execv({sys.executable!r}, [{sys.executable!r}, *args])
""",
    )
    _script(
        bin_dir / "uv",
        """import os, shutil, sys
args = sys.argv[1:]
assert args[0] == "run", args
args = [a for a in args[1:] if a != "--frozen"]
os.execv(shutil.which(args[0]), args)
""",
    )
    _script(
        bin_dir / "make",
        """import re, subprocess, sys
target = sys.argv[1]
if target in NOT_RUN:
    print(f"(readme test: make {target} not run here)")
    sys.exit(0)
recipe = re.search(rf"^{re.escape(target)}:.*\\n((?:\\t.*\\n)+)", open("Makefile").read(), re.M).group(1)
for line in recipe.splitlines():
    code = subprocess.run(line.strip().replace("$(RUN)", "uv run --frozen"), shell=True).returncode
    if code:
        sys.exit(code)
""".replace("NOT_RUN", repr(sorted(NOT_RUN_MAKE_TARGETS))),
    )
    _script(
        bin_dir / "tensorboard",
        """import sys
from pathlib import Path
logdir = Path(sys.argv[sys.argv.index("--logdir") + 1])
assert any(logdir.rglob("events.out.tfevents.*")), f"no TensorBoard events under {logdir}"
print(f"(readme test: tensorboard would serve {logdir})")
""",
    )
    shutil.copy(bin_dir / "python", bin_dir / "python3")


def project_copy(dest: Path) -> None:
    """The project's tracked and untracked (not ignored) files, as a clone has them."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.mark.slow
def test_every_block_runs_as_written_from_a_fresh_copy(shared_data, tmp_path):
    repo, bin_dir = tmp_path / "robust", tmp_path / "bin"
    project_copy(repo)
    stand_ins(bin_dir)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "ROBUST_DATA": str(shared_data),
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    ran = 0
    for lang, code, marker in blocks():
        if (marker or "").startswith("flags-only"):
            continue
        cmd = [str(bin_dir / "python"), "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (
            f"README block failed:\n{code}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        ran += 1
    assert ran >= 8
    # What the README says these commands leave behind
    logs = repo / "lightning_logs" / "digits"
    assert (logs / "best.ckpt").resolve().is_file() and (logs / "last.ckpt").resolve().is_file()
    # the report's folder names the run and checkpoint that best.ckpt points to, and the data
    [report_md] = (repo / "reports").glob("digits-version_*-best-epoch*-digits/report.md")
    assert report_md.read_text().startswith("# Robustness of `best.ckpt`")
    assert (repo / "fooled" / "figure.png").is_file() and (repo / "model" / "model.onnx").is_file()
    assert any((repo / "lightning_logs" / "imagefolder").rglob("last.ckpt"))
