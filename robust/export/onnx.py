"""ONNX export of a classifier, checked in onnxruntime against the torch model (needs the ``onnx`` extra).

The graph takes ``images``: ``N×C×S×S`` float32 in [0, 1] with a dynamic batch ``N`` (normalization is inside,
as in every model here) and returns ``logits``: ``N×num_classes`` float32. No Lightning import.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from robust.errors import RobustError
from robust.models.build import CardedModel
from robust.models.card import ModelCard

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

INPUT_NAME, OUTPUT_NAME = "images", "logits"
PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # torch.onnx's exporter needs the first two
PROVIDER = "CPUExecutionProvider"
TOLERANCE = 1e-3  # the largest |logit difference| between onnxruntime and torch an export may have
CHECK_IMAGES = 32


def require_onnx() -> None:
    """RobustError naming the extra to install unless onnx, onnxscript and onnxruntime import."""
    missing = []
    for name in PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RobustError(
            f"ONNX export needs {', '.join(missing)}: install the 'onnx' extra "
            "(pip install 'robust[onnx]', or uv sync --extra onnx)"
        )


def to_onnx(model: torch.nn.Module, image_size: int, channels: int = 3) -> tuple[bytes, int]:
    """``model`` (``N×C×S×S`` in [0, 1] -> logits, ``S = image_size``, ``C = channels``) as a serialized ONNX model
    with a dynamic batch, by torch's default (dynamo) exporter; and the opset it used."""
    example = torch.rand(2, channels, image_size, image_size)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
        proto = program.model_proto
    except Exception as exc:
        why = (str(exc).strip().splitlines() or [""])[0]
        raise RobustError(f"torch.onnx.export could not convert the model ({type(exc).__name__}: {why})") from None
    opset = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    return proto.SerializeToString(), int(opset)


def onnx_session(onnx_model: bytes | str | Path) -> InferenceSession:
    """An onnxruntime CPU session of a serialized ONNX model or ``.onnx`` file, as many threads as torch uses
    (onnxruntime ignores ``OMP_NUM_THREADS``)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(
        onnx_model if isinstance(onnx_model, bytes) else str(onnx_model), options, providers=[PROVIDER]
    )


def onnx_logits(session: InferenceSession, x: Tensor) -> Tensor:
    """Logits (``N×K``) an :func:`onnx_session` computes for images ``x`` (``N×C×S×S`` in [0, 1])."""
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().float().numpy()})
    return torch.from_numpy(logits)


def check_batch(card: ModelCard, data: str | None = None) -> tuple[Tensor, dict]:
    """``CHECK_IMAGES`` images (``N×C×S×S`` in [0, 1], the card's size and channels) to compare the runtimes on, and
    what they are. ``data``: ``digits``, ``mnist``, ``cifar10`` or an image folder, read as
    :func:`robust.data.eval_data.eval_data` reads it; by default the embedded digits for a model trained on them, else
    uniform noise images drawn with seed 0."""
    if data is None and card.data == "Digits":
        data = "digits"
    if data is None:
        size = card.image_size
        x = torch.rand(CHECK_IMAGES, card.channels, size, size, generator=torch.Generator().manual_seed(0))
        return x, {"name": "random", "distribution": "uniform [0, 1]", "seed": 0, "n": CHECK_IMAGES}
    from robust.data.eval_data import eval_data

    loader, identity = eval_data(data, card, limit=CHECK_IMAGES, batch_size=CHECK_IMAGES)
    return next(iter(loader))[0], identity


def export_onnx(model: CardedModel, data: str | None = None) -> tuple[bytes, dict]:
    """``model`` as serialized ONNX and the card's ``onnx`` record, after running it in onnxruntime on
    :func:`check_batch` ``(card, data)``: RobustError when any logit differs from torch's by more than TOLERANCE."""
    card = model.card
    onnx_model, opset = to_onnx(model, card.image_size, card.channels)
    x, identity = check_batch(card, data)
    with torch.no_grad():
        expected = model(x)
    diff = float((onnx_logits(onnx_session(onnx_model), x) - expected).abs().max())
    if not diff <= TOLERANCE:  # also refuses NaN
        raise RobustError(
            f"onnxruntime's logits differ from torch's by up to {diff:.3g} on {len(x)} "
            f"{identity['name']} images (tolerance {TOLERANCE:g}); refusing to write the export"
        )
    record = {
        "opset": opset,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "input_shape": ["batch", card.channels, card.image_size, card.image_size],
        "check": {"provider": PROVIDER, "data": identity, "max_abs_logit_diff": diff, "tolerance": TOLERANCE},
    }
    return onnx_model, record
