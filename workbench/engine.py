"""Composer's event engine with its per-event bookkeeping done once instead of on every event.

A training step runs 13 events, and Composer 0.32.1's ``Engine.run_event`` spends more host time on each than the
callbacks it dispatches to: it rebuilds the logger / non-logger callback lists with ``isinstance`` for every
event, calls every callback for every event (most inherit the base class's empty method), and compares the event
against sets of events with ``StringEnum.__eq__``, a Python function (~25 comparisons per event). Measured on the
1-layer model with one thread, that was about half of the framework's host time per step.

:class:`LeanEngine` dispatches an event to exactly the callbacks that act on it, in Composer's order (algorithms,
then non-logger callbacks, then loggers), with the same checks, and returns the same traces. The per-event work
is cached, keyed on the identity of the callbacks in the list, so a callback added, removed or replaced later is
seen. Composer's own ``run_event`` still runs ``INIT``, events given as strings, and everything while its profiler
or ``ENGINE_DEBUG`` is on (their markers and messages stay exactly Composer's). tests/test_engine.py compares the
two engines call for call and pins the Composer source this mirrors."""

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
    on a built trainer's engine by :func:`make_lean` (the trainer constructs its engine itself).

    The cache is keyed on the identity of the callbacks in ``state.callbacks``, read where Composer reads the list
    (after the algorithms, and again before the loggers): adding, removing or replacing a callback, even from
    inside an event, is seen. Assigning a method to a callback (or its class) after the first events is not: plan
    such a callback from the start, or override ``run_event``."""

    _dispatch_key: tuple[Callback, ...]
    _dispatch_ids: tuple[int, ...]
    _dispatch: dict[int, tuple[tuple[Callback, ...], tuple[Callback, ...]]]
    _checks: dict[int, tuple[bool, bool]]

    def run_event(self, event: Event | str) -> Traces:  # type: ignore[override]
        if (type(event) is not Event or event is Event.INIT or self._is_closed or self.state.profiler is not None
                or os.environ.get("ENGINE_DEBUG")):
            return super().run_event(event)
        state = self.state
        checks = self._checks.get(id(event))
        if checks is None:
            checks = self._checks[id(event)] = _checks(event)
        # Composer's _assert_dataloader_and_duration_set, with the event's part decided once
        if checks[0]:
            assert state.dataloader is not None, f'The trainer should have set state.dataloader for event {event}.'
        if checks[1]:
            assert state.max_duration is not None, f'The trainer should have set state.max_duration for event {event}.'
        traces = self._run_algorithms(event) if state.algorithms else OrderedDict()
        logger = self.logger
        for callback in self._listeners(event)[0]:
            callback.run_event(event, state, logger)
        for callback in self._listeners(event)[1]:
            callback.run_event(event, state, logger)
        return traces

    def _listeners(self, event: Event) -> tuple[tuple[Callback, ...], tuple[Callback, ...]]:
        """The event's non-logger and logger callbacks that act on it, each in list order, for the callbacks in
        ``state.callbacks`` now (the cached tuple keeps them alive, so equal ids mean the same objects)."""
        callbacks = self.state.callbacks
        ids = tuple(map(id, callbacks))
        if ids != self._dispatch_ids:
            self._dispatch_key, self._dispatch_ids, self._dispatch = tuple(callbacks), ids, {}
        plan = self._dispatch.get(id(event))
        if plan is None:
            others = tuple(cb for cb in self._dispatch_key
                           if not isinstance(cb, LoggerDestination) and acts_on(cb, event))
            loggers = tuple(cb for cb in self._dispatch_key if isinstance(cb, LoggerDestination) and acts_on(cb, event))
            plan = self._dispatch[id(event)] = (others, loggers)
        return plan


def _checks(event: Event) -> tuple[bool, bool]:
    """Whether Composer asserts a dataloader, and a max duration, at ``event`` (never INIT, which is not planned)."""
    needs_dataloader = all(event is not other for other in _NO_DATALOADER_NEEDED)
    needs_duration = (all(event is not other for other in _NO_DURATION_NEEDED) and not event.is_predict
                      and not event.is_eval)
    return needs_dataloader, needs_duration


def make_lean(engine: Engine) -> LeanEngine:
    """Turns a constructed Composer engine into a :class:`LeanEngine` in place (the same object: Composer registered
    its ``close`` at exit and closes it when it is collected, so a copy would be closed twice)."""
    engine.__class__ = LeanEngine
    lean: Any = engine
    lean._dispatch_key, lean._dispatch_ids, lean._dispatch, lean._checks = (), (), {}, {}
    return lean
