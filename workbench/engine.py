"""Composer's event engine with its per-event bookkeeping done once instead of on every event.

A training step runs 13 events, and Composer 0.32.1's ``Engine.run_event`` spends more host time on each than the
callbacks it dispatches to: it rebuilds the logger / non-logger callback lists with ``isinstance`` for every
event, calls every callback for every event (most inherit the base class's empty method), and compares the event
against sets of events with ``StringEnum.__eq__``, a Python function (~25 comparisons per event). Measured on the
1-layer model with one thread, that was about half of the framework's host time per step.

:class:`LeanEngine` dispatches an event to exactly the callbacks that act on it, in Composer's order (algorithms,
then non-logger callbacks, then loggers), with the same checks, and returns the same traces. The per-event work
is cached, keyed on the callback list's contents, so a callback added later is seen. Composer's own
``run_event`` still runs ``INIT``, events given as strings, and everything while its profiler or ``ENGINE_DEBUG``
is on (their markers and messages stay exactly Composer's). tests/test_engine.py compares the two engines call
for call and pins the Composer source this mirrors."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from composer.core import Callback, Event
from composer.core.engine import Engine, Traces
from composer.loggers import LoggerDestination

_NO_DATALOADER_NEEDED = (Event.INIT, Event.BEFORE_LOAD, Event.AFTER_LOAD, Event.EVAL_STANDALONE_START,
                         Event.EVAL_STANDALONE_END)
_NO_DURATION_NEEDED = (Event.INIT, Event.BEFORE_LOAD, Event.AFTER_LOAD)


def acts_on(callback: Callback, event: Event) -> bool:
    """Whether calling ``callback.run_event(event, ...)`` can do anything: its class overrides ``run_event`` or the
    event's method, or the instance carries its own attribute of that name. The base class's methods are empty."""
    kind = type(callback)
    return (kind.run_event is not Callback.run_event or getattr(kind, event.value) is not getattr(Callback, event.value)
            or event.value in getattr(callback, "__dict__", {}))


class LeanEngine(Engine):
    """Composer's :class:`~composer.core.engine.Engine` with a cached dispatch (see the module docstring). Installed
    on a built trainer's engine by :func:`make_lean` (the trainer constructs its engine itself)."""

    _dispatch_key: tuple[Callback, ...] | None
    _dispatch: dict[int, tuple[bool, bool, tuple[Callback, ...]]]

    def run_event(self, event: Event | str) -> Traces:  # type: ignore[override]
        if (type(event) is not Event or event is Event.INIT or self._is_closed or self.state.profiler is not None
                or os.environ.get("ENGINE_DEBUG")):
            return super().run_event(event)
        state = self.state
        callbacks = tuple(state.callbacks)
        if callbacks != self._dispatch_key:
            self._dispatch_key, self._dispatch = callbacks, {}
        plan = self._dispatch.get(id(event))
        if plan is None:
            plan = self._dispatch[id(event)] = self._plan(event, callbacks)
        needs_dataloader, needs_duration, listeners = plan
        # Composer's _assert_dataloader_and_duration_set, with the event's part decided once
        if needs_dataloader:
            assert state.dataloader is not None, f'The trainer should have set state.dataloader for event {event}.'
        if needs_duration:
            assert state.max_duration is not None, f'The trainer should have set state.max_duration for event {event}.'
        traces = self._run_algorithms(event) if state.algorithms else OrderedDict()
        logger = self.logger
        for callback in listeners:
            callback.run_event(event, state, logger)
        return traces

    @staticmethod
    def _plan(event: Event, callbacks: tuple[Callback, ...]) -> tuple[bool, bool, tuple[Callback, ...]]:
        """The event's checks and its listeners: non-logger callbacks first, then loggers, each in list order
        (Composer runs them in that order for every event but INIT, which is never planned)."""
        needs_dataloader = all(event is not other for other in _NO_DATALOADER_NEEDED)
        needs_duration = (all(event is not other for other in _NO_DURATION_NEEDED) and not event.is_predict
                          and not event.is_eval)
        loggers = [cb for cb in callbacks if isinstance(cb, LoggerDestination)]
        others = [cb for cb in callbacks if not isinstance(cb, LoggerDestination)]
        listeners = tuple(cb for cb in [*others, *loggers] if acts_on(cb, event))
        return needs_dataloader, needs_duration, listeners


def make_lean(engine: Engine) -> LeanEngine:
    """Turns a constructed Composer engine into a :class:`LeanEngine` in place (the same object: Composer registered
    its ``close`` at exit and closes it when it is collected, so a copy would be closed twice)."""
    engine.__class__ = LeanEngine
    lean: Any = engine
    lean._dispatch_key, lean._dispatch = None, {}
    return lean
