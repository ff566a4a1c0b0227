"""Callbacks: what the model sees, as an image grid in TensorBoard, and a validation at the end of every run (the
overfitting guard is in robust.training.guard)."""

from __future__ import annotations

import lightning as L
import torch

from robust.attacks import pgd, seeded_rng
from robust.defenses import jpeg


class AdversarialImages(L.Callback):
    """After each validation, log a figure of ``n`` validation images to TensorBoard (``val/images``).

    Rows: original, perturbation (amplified to the full grey range), PGD adversarial, JPEG of adversarial;
    each titled with its true / predicted class names.

    Args:
        n: images in the grid (the first ones of the first validation batch); 0: no grid.
    """

    def __init__(self, n: int = 8) -> None:
        self.n = n
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self.n > 0:
            x, y = batch
            self._batch = (x[: self.n].detach(), y[: self.n].detach())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if self._batch is None or trainer.sanity_checking or not hasattr(experiment, "add_figure"):
            return
        fig = self.figure(pl_module, *self._batch)
        experiment.add_figure("val/images", fig, global_step=trainer.global_step)

    @staticmethod
    def figure(pl_module, x: torch.Tensor, y: torch.Tensor):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        spec, names = pl_module.val_spec, pl_module.class_names
        eps = spec.eps
        with torch.enable_grad(), seeded_rng(0, pl_module.device):
            x_adv = pgd(pl_module, x, y, eps, spec.step, spec.steps, norm=spec.norm)
        x_jpeg = jpeg(x_adv, spec.quality)
        peak = float((x_adv - x).abs().max())  # the largest pixel change: eps in L-inf, less in L2
        perturbation = ((x_adv - x) / (2 * peak) + 0.5).clamp(0, 1) if peak > 0 else torch.full_like(x, 0.5)
        rows = [("original", x), ("perturbation (scaled)", perturbation), ("adversarial", x_adv), ("JPEG(adv)", x_jpeg)]
        with torch.no_grad():
            preds = {label: pl_module(imgs).argmax(1) for label, imgs in rows if label != "perturbation (scaled)"}
        n = len(x)
        fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.9 * len(rows)), squeeze=False)
        for r, (label, imgs) in enumerate(rows):
            for c in range(n):
                ax = axes[r][c]
                pixels = imgs[c].float().permute(1, 2, 0).cpu().numpy()
                if pixels.shape[-1] == 1:  # grayscale
                    ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(pixels, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if label in preds:
                    p = int(preds[label][c])
                    ok = p == int(y[c])
                    ax.set_title(f"{names[int(y[c])]}→{names[p]}", fontsize=7, color="green" if ok else "red")
                if c == 0:
                    ax.set_ylabel(label, fontsize=8)
        fig.suptitle(f"PGD-{spec.steps}, eps={eps:.4f}; titles: true→predicted", fontsize=9)
        fig.tight_layout()
        return fig


class ValidateAtEnd(L.Callback):
    """Validate the last epoch of every run, whatever ``check_val_every_n_epoch`` says.

    ``configs/digits.yaml`` validates every 10 epochs (its validation costs about three epochs): a shorter run, or a
    resumed one that ends between two multiples, would otherwise end without any validation, hence without a best
    checkpoint. This turns the interval to 1 for the last epoch (by ``max_epochs``) only; validation switched off
    (``limit_val_batches 0``) stays off."""

    def __init__(self) -> None:
        self._interval: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        every, last = trainer.check_val_every_n_epoch, trainer.max_epochs
        if every is None or every <= 1 or last is None or last < 1 or trainer.current_epoch != last - 1:
            return
        if (trainer.current_epoch + 1) % every:
            self._interval = every
            trainer.check_val_every_n_epoch = 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._interval is not None:
            trainer.check_val_every_n_epoch, self._interval = self._interval, None
