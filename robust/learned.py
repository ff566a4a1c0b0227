"""Whether a classifier has learned at all: the one rule that training's checkpoint choice, its closing lines, the
model card and the report share.

A model whose clean accuracy is within :data:`NEAR_CHANCE` of chance (1/classes), or that gives one class to
nearly every image, has not learned; its robust accuracy means nothing (a constant classifier is never fooled
"differently": on 4 balanced classes it keeps 25% under any attack). No torch: the report's renderer uses it too.
"""

from __future__ import annotations

import math

NEAR_CHANCE = 0.10  # accuracy points above chance that still count as chance
CONSTANT_SHARE = 0.98  # the most predicted class's share of the predictions that makes them constant

REMEDY = (
    "more optimizer steps (a smaller --data.init_args.batch_size, more --trainer.max_epochs), pretrained weights "
    "(configs/imagefolder_finetune.yaml) with augmentation (--data.init_args.augment true), or clean training first "
    "(--model.attack none)"
)


def not_learned(clean: float | None, num_classes: int, top_share: float | None = None) -> str | None:
    """Why a model with clean accuracy ``clean`` over ``num_classes`` classes (``top_share``: the share of its
    predictions given to its most predicted class) has not learned, in a few words; None when it has, or when
    ``clean`` is unknown."""
    if clean is None or num_classes < 2:
        return None
    if top_share is not None and top_share >= CONSTANT_SHARE:
        return f"the model gives one class to {top_share:.0%} of the images (clean accuracy {clean:.3f})"
    chance = 1 / num_classes
    if clean < chance + NEAR_CHANCE:
        return (
            f"the model's clean accuracy {clean:.3f} is within {NEAR_CHANCE * 100:.0f} points of chance "
            f"({chance:.3f} for {num_classes} classes)"
        )
    return None


MIN_EPOCH_STEPS = 10  # optimizer steps an epoch below which a run is told to use a smaller batch
MIN_RUN_STEPS = 200  # optimizer steps of a run below which it is told to train longer
FEW_IMAGES = 1000  # training images below which training from scratch is pointed to fine-tuning


def small_data_advice(
    images: int, batch_size: int, total_steps: int, pretrained: bool, augment: bool | None = None
) -> str | None:
    """One line for a run whose data is too small for its settings (``images`` training images at ``batch_size``,
    ``total_steps`` optimizer steps in all; ``pretrained``: it starts from trained weights; ``augment``: the data
    module's augmentation, None when it has none), saying what to change; None when nothing needs to."""
    per_epoch = max(1, math.ceil(images / batch_size))
    changes = []
    if per_epoch < MIN_EPOCH_STEPS or total_steps < MIN_RUN_STEPS:
        batch = max(8, 2 ** int(math.log2(max(1, images / MIN_EPOCH_STEPS))))
        epochs = math.ceil(MIN_RUN_STEPS / math.ceil(images / batch))
        changes.append(
            f"--data.init_args.batch_size {batch} ({math.ceil(images / batch)} an epoch) with --trainer.max_epochs "
            f"{epochs} ({MIN_RUN_STEPS}+ steps)"
            if batch < batch_size
            else f"--trainer.max_epochs {math.ceil(MIN_RUN_STEPS / per_epoch)} ({MIN_RUN_STEPS}+ steps)"
        )
    if images < FEW_IMAGES and not pretrained:
        changes.append("fine-tuning pretrained weights (configs/imagefolder_finetune.yaml)")
    if not changes:
        return None
    if augment is False:
        changes.append("augmentation (--data.init_args.augment true)")
    return (
        f"small data: {images} training images at batch {batch_size} make {per_epoch} optimizer step(s) an epoch, "
        f"{total_steps} in this run; a model may not learn from so little: try " + ", or ".join(changes)
    )
