"""Which device a command runs on, decided one way for every command and for ``trainer.device``.

Names are torch's (``cuda``, ``cpu``); ``gpu`` is accepted as an alias of ``cuda`` (the run config and
``workbench eval`` used to take only ``gpu``, ``workbench bench`` only ``cuda``). Composer's Trainer calls the
same device ``gpu``: :func:`composer_device` translates at that one boundary."""

from __future__ import annotations

import re

DEVICE_CHOICES = ("auto", "cpu", "cuda", "gpu")  # gpu: the same as cuda
DEVICE_HELP = "auto: cuda when a CUDA device is visible, else cpu; gpu is the same as cuda"


def resolve_device(choice: str, source: str = "command line", key: str = "--device") -> str:
    """``auto``/``cpu``/``cuda``/``gpu`` -> ``"cuda"`` or ``"cpu"`` (``cuda:N``, as lm-evaluation-harness passes
    it, stays ``cuda:N``). Asking for CUDA on a machine without a CUDA device is a ConfigError naming ``source``
    and ``key`` (the flag or the dotted config key)."""
    import torch

    from workbench.config import ConfigError

    indexed = isinstance(choice, str) and re.fullmatch(r"cuda:[0-9]+", choice) is not None
    if choice not in DEVICE_CHOICES and not indexed:
        raise ConfigError(source, key, f"expected one of {', '.join(DEVICE_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(source, key, f"{choice} requested but no CUDA device is available; use cpu or auto")
    return choice if indexed else "cuda"


def composer_device(device: str) -> str:
    """torch's device name -> Composer's (``cuda`` -> ``gpu``), for ``Trainer(device=...)``."""
    return "gpu" if device == "cuda" else device
