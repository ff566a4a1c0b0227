"""The files a training run leaves behind, and what it says about them at its end.

- :func:`run_summary`: the lines ``train.py`` prints at the end of every run (logs, best checkpoint or why there is
  none, a line when its model has not learned, ``last.ckpt``), after :func:`link_latest` points
  ``<save_dir>/<name>/best.ckpt`` and ``last.ckpt`` at the run's files, so a stable path always names the latest
  run's checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

# robust.training.runfiles' old names, now robust.data.roots' (the old path robust.training.runfiles resolves here:
# robust.moved)
from robust.data.roots import DATA_ENV, data_root, resolve_data_root, shared_data_dir  # noqa: F401, E402
from robust.learned import REMEDY


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` (a relative symlink, replaced atomically; a copy where symlinks are not allowed)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(os.path.relpath(target, link.parent))
    except OSError:
        import shutil

        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def link_latest(folder: Path, best: str | None, last: str | None) -> dict[str, Path]:
    """Make ``folder/best.ckpt`` and ``folder/last.ckpt`` point at ``best`` and ``last`` (when they exist); a stale
    ``best.ckpt`` of an earlier run is removed when this run has none. Returns the links made."""
    links = {}
    for name, target in (("best.ckpt", best), ("last.ckpt", last)):
        link = folder / name
        if target and Path(target).is_file():
            _link(link, Path(target))
            links[name] = link
        elif link.is_symlink():
            link.unlink()
    return links


def no_best_reason(trainer, monitor: str | None) -> str:
    """Why a run has no best checkpoint, in a few words."""
    if monitor is None:
        return "the checkpoint monitors nothing (--checkpoint.monitor)"
    if trainer.limit_val_batches == 0:
        return "validation is off (--trainer.limit_val_batches 0)"
    if trainer.current_epoch == 0 and trainer.global_step == 0:
        return "nothing was trained"
    if monitor not in trainer.callback_metrics:
        return (
            f"no validation finished, so {monitor} was never measured (validation runs every "
            f"{trainer.check_val_every_n_epoch} epochs and at the last one; the run stopped before)"
        )
    return f"no checkpoint was saved for {monitor}"


def run_summary(trainer, log_dir: str | None) -> list[str]:
    """The lines printed at the end of a run: where its logs, best checkpoint (or why there is none) and last.ckpt
    are, and the stable links to them (:func:`link_latest`)."""
    best_cb = trainer.checkpoint_callback
    last_cb = next((cb for cb in trainer.checkpoint_callbacks if cb is not best_cb), None)
    best = best_cb.best_model_path if best_cb is not None else None
    last = last_cb.best_model_path if last_cb is not None else getattr(best_cb, "last_model_path", None)
    lines = []
    if log_dir:
        lines.append(f"TensorBoard logs: {log_dir}   (view: uv run tensorboard --logdir {log_dir})")
    if best:
        score = best_cb.real_score() if hasattr(best_cb, "real_score") else float(best_cb.best_model_score)
        lines.append(f"Best checkpoint ({best_cb.monitor} = {score:.4f}): {best}")
        reason = best_cb.best_not_learned() if hasattr(best_cb, "best_not_learned") else None
        if reason:
            lines.append(f"Not learned: {reason}, so its robust accuracy means nothing; try {REMEDY}")
    else:
        lines.append(f"Best checkpoint: none: {no_best_reason(trainer, getattr(best_cb, 'monitor', None))}")
    lines.append(f"Last checkpoint: {last}" if last else "Last checkpoint: none (--last_checkpoint is off)")
    if log_dir:
        links = link_latest(Path(log_dir).parent, best, last)
        if links:
            lines.append("The latest run's, always: " + ", ".join(str(p) for p in links.values()))
    return lines
