"""Drop third-party advice that contradicts how sdsweep is meant to run.

sdsweep deliberately runs without torchvision (the only torchvision for the pinned torch is a CUDA
build that breaks torchmetrics, transformers and diffusers imports; see the README). transformers 5
then logs, once per lazy module (twice per process):

    `CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`
    for backward compatibility. Install torchvision to use the default backend, ...

The PIL fallback is what sdsweep wants, so that one message is filtered; every other transformers
warning still shows. ``install()`` is idempotent and cheap (no transformers import): entry points
call it at import.
"""

from __future__ import annotations

import logging

# The logger transformers' lazy-import machinery warns on, and the message's stable part.
TORCHVISION_LOGGER = "transformers.utils.import_utils"
TORCHVISION_ADVICE = "requires torchvision (not installed); falling back to"


class DropTorchvisionAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_ADVICE not in record.getMessage()


def install() -> None:
    logger = logging.getLogger(TORCHVISION_LOGGER)
    if not any(isinstance(f, DropTorchvisionAdvice) for f in logger.filters):
        logger.addFilter(DropTorchvisionAdvice())
