"""Changes to Composer's internals, applied once when this module is first imported (by ``workbench.train``) and
only on the Composer release they were written and measured against.

``Engine._debug_log``: Composer 0.32.1 (its last release) formats a timestamp string for every event x
callback x algorithm and only then checks ``ENGINE_DEBUG``: ~0.5 ms of host time per step (measured, 1-layer
model on CPU), all of it discarded. The replacement checks ``ENGINE_DEBUG`` first and formats only when it is
set, so engine debugging works as before. On any other Composer version the original is kept and a warning
says so (the private method may have changed or been fixed)."""

from __future__ import annotations

import os
import warnings
from typing import Any

PINNED_COMPOSER = "0.32.1"


def _make_debug_log(original: Any) -> Any:
    def _debug_log(self: Any, event: Any, msg: str) -> None:
        """Composer's ``Engine._debug_log``, called only when ``ENGINE_DEBUG`` is set (workbench.composer_patches)."""
        if os.environ.get("ENGINE_DEBUG"):
            original(self, event, msg)

    _debug_log.__wrapped__ = original  # type: ignore[attr-defined]
    return _debug_log


def patch_engine_debug_log(version: str | None = None) -> bool:
    """Install the cheap ``Engine._debug_log`` (once: a second call finds it installed). Returns whether it is
    installed; ``version`` defaults to the installed Composer's."""
    import composer
    from composer.core.engine import Engine

    if getattr(Engine._debug_log, "__wrapped__", None) is not None:
        return True
    version = composer.__version__ if version is None else version
    if version != PINNED_COMPOSER:
        warnings.warn(f"Composer {version} is installed, the workbench pins {PINNED_COMPOSER}: its engine "
                      "debug-log patch (~0.5 ms host time per step) is not applied", stacklevel=2)
        return False
    Engine._debug_log = _make_debug_log(Engine._debug_log)
    return True


ENGINE_PATCHED = patch_engine_debug_log()
