"""Errors raised by the metric suite, and the shared input check for uint8 image batches."""

from __future__ import annotations

import numpy as np
import torch
from copgen.errors import CopgenError


class MetricInputError(CopgenError, ValueError):
    """A metric got an input it cannot use; the message names the argument and what was wrong."""

    def __init__(self, argument: str, problem: str, context: str = "") -> None:
        self.argument = argument
        self.problem = problem
        self.context = context
        where = f" ({context})" if context else ""
        super().__init__(f"{argument}: {problem}{where}")


class FeatureExtractorUnavailable(CopgenError, RuntimeError):
    """A feature extractor's weights are not available offline; the message says how to install them."""


def as_uint8_batch(images: np.ndarray | torch.Tensor, argument: str, context: str = "") -> torch.Tensor:
    """Check a thumbnail batch and return it as a uint8 tensor of shape (B, H, W, C) with C in {1, 3}.

    Accepts (B, H, W) grey batches (a channel axis is added). Raises :class:`MetricInputError` naming
    ``argument`` for any other dtype or shape, so a flow's error says which batch was bad.
    """
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if tensor.dtype != torch.uint8:
        raise MetricInputError(argument, f"expected uint8 thumbnails, got dtype {tensor.dtype}", context)
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(-1)
    if tensor.ndim != 4 or tensor.shape[-1] not in (1, 3):
        raise MetricInputError(
            argument, f"expected shape (B, H, W, 3) or (B, H, W), got {tuple(tensor.shape)}", context
        )
    if tensor.shape[0] == 0:
        raise MetricInputError(argument, "empty batch", context)
    return tensor


def check_same_shape(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], context: str = "") -> None:
    """Paired metrics need images of the same shape; say which two batches disagree."""
    if a.shape != b.shape:
        raise MetricInputError(
            f"{names[0]}/{names[1]}",
            f"paired batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}",
            context,
        )
