"""Rewrite robust.<old> module references to the new layout in the given files (idempotent)."""
import re, sys
from pathlib import Path

MOVED = {
    "images": "data.images",
    "eval_data": "data.eval_data",
    "archs": "models.archs",
    "card": "models.card",
    "hf": "models.hf",
    "loading": "models.resolve",
    "module": "training.module",
    "run_record": "training.run_record",
    "optim": "training.optim",
    "guard": "training.guard",
    "averaging": "training.averaging",
    "callbacks": "training.callbacks",
    "progress": "training.progress",
    "precision": "training.precision",
    "resume": "training.resume",
    "runfiles": "training.runfiles",
    "checkpointing": "training.checkpointing",
    "report": "evaluation.report",
    "render": "evaluation.render",
    "sharding": "evaluation.sharding",
    "fool": "evaluation.fool",
    "onnx_export": "export.onnx",
}
# names that moved from robust.runfiles to robust.data.roots
ROOTS = {"data_root", "shared_data_dir", "resolve_data_root", "DATA_ENV"}
old = "|".join(sorted(MOVED, key=len, reverse=True))
dotted = re.compile(rf"\brobust\.({old})\b(?!\.py)")
slashed = re.compile(rf"\brobust/({old})\.py\b")
from_robust = re.compile(rf"^(\s*)from robust import ({old})(\s+as\s+\w+)?\s*$", re.M)


def fix_runfiles(text: str) -> str:
    def repl(m):
        indent, names = m.group(1), [n.strip() for n in m.group(2).split(",")]
        roots = [n for n in names if n.split(" as ")[0] in ROOTS]
        rest = [n for n in names if n not in roots]
        out = []
        if roots:
            out.append(f"{indent}from robust.data.roots import {', '.join(roots)}")
        if rest:
            out.append(f"{indent}from robust.training.runfiles import {', '.join(rest)}")
        return "\n".join(out)

    text = re.sub(r"^(\s*)from robust\.runfiles import ([\w, ]+)$", repl, text, flags=re.M)
    return re.sub(r"\brobust\.runfiles\.(" + "|".join(ROOTS) + r")\b", r"robust.data.roots.\1", text)


PACKAGES = (
    ("models", "build", ("archs", "build", "card", "hf", "resolve")),
    ("data", "modules", ("modules", "images", "eval_data", "roots")),
    ("export", "folder", ("folder", "onnx")),
)


def rewrite(text: str) -> str:
    text = fix_runfiles(text)
    text = from_robust.sub(
        lambda m: f"{m.group(1)}from robust.{MOVED[m.group(2)].rsplit('.', 1)[0]} import "
        f"{MOVED[m.group(2)].rsplit('.', 1)[1]}{m.group(3) or (' as ' + m.group(2) if MOVED[m.group(2)].rsplit('.', 1)[1] != m.group(2) else '')}",
        text,
    )
    text = slashed.sub(lambda m: "robust/" + MOVED[m.group(1)].replace(".", "/") + ".py", text)
    text = dotted.sub(lambda m: "robust." + MOVED[m.group(1)], text)
    # the old flat modules that became packages: library code imports their files
    text = re.sub(r"\bfrom robust\.models import (?!(?:archs|build|card|hf|resolve)\b)", "from robust.models.build import ", text)
    text = re.sub(r"\bfrom robust\.data import (?!(?:modules|images|eval_data|roots)\b)", "from robust.data.modules import ", text)
    text = re.sub(r"\bfrom robust\.export import (?!(?:folder|onnx)\b)", "from robust.export.folder import ", text)
    text = re.sub(r"\brobust\.models\.(create_model|load_model)\b", r"robust.models.resolve.\1", text)
    text = re.sub(r"\brobust\.models\.(ARCHS)\b", r"robust.models.archs.\1", text)
    text = re.sub(r"\brobust\.models\.(ModelCard)\b", r"robust.models.card.\1", text)
    for package, home, subs in PACKAGES:
        text = re.sub(
            rf"\brobust\.{package}\.(?!(?:{'|'.join(subs)})\b)([A-Za-z_]\w*)", rf"robust.{package}.{home}.\1", text
        )
    text = re.sub(r"\brobust/models\.py\b", "robust/models/build.py", text)
    text = re.sub(r"\brobust/data\.py\b", "robust/data/modules.py", text)
    text = re.sub(r"\brobust/export\.py\b", "robust/export/folder.py", text)
    return text


if __name__ == "__main__":
    for name in sys.argv[1:]:
        p = Path(name)
        t = p.read_text()
        n = rewrite(t)
        if n != t:
            p.write_text(n)
            print("rewrote", p)
