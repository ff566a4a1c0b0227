"""A training callback for fault tests: stop the process's progress at a known step, so a test can kill it there.

``train.py fit ... --trainer.callbacks+='{"class_path": "tests.stall.StallAtStep", "init_args": {...}}'``: after the
optimizer step ``step``, write ``marker`` and wait to be killed (no timing guess in the test: it waits for the file).
When ``marker`` already exists (the resumed run, same command line), it does nothing. It draws no random numbers and
keeps no state, so it leaves the training trajectory as it is.
"""

from __future__ import annotations

import threading
from pathlib import Path

import lightning as L


class StallAtStep(L.Callback):
    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.write_text(f"{trainer.global_step}\n")
            threading.Event().wait()  # until SIGKILL
