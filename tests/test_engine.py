"""The lean event engine (workbench/engine.py) dispatches exactly what Composer's engine dispatches, in the same
order, and keeps Composer's path where it must (INIT, string events, the profiler, ENGINE_DEBUG)."""

from __future__ import annotations

import hashlib
import inspect

import pytest
from composer.core import Callback, Event
from composer.core.engine import Engine
from composer.loggers import LoggerDestination

import workbench.trainer
from workbench.engine import LeanEngine, acts_on
from workbench.train import build_run, train


class MethodRecorder(Callback):
    """Overrides two event methods, as most callbacks do."""

    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def batch_end(self, state, logger) -> None:
        self.calls.append((self.name, "batch_end", int(state.timestamp.batch)))

    def after_loss(self, state, logger) -> None:
        self.calls.append((self.name, "after_loss", int(state.timestamp.batch)))


class EventRecorder(Callback):
    """Overrides run_event: sees every event."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def run_event(self, event, state, logger) -> None:
        self.calls.append(("events", event.value, int(state.timestamp.batch)))


class LoggerRecorder(LoggerDestination):
    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def batch_end(self, state, logger) -> None:
        self.calls.append(("logger", "batch_end", int(state.timestamp.batch)))


def _recorded_run(tiny_config, name: str) -> list:
    calls: list = []
    # the logger first in the list: Composer runs non-logger callbacks before loggers whatever the list order
    callbacks = [LoggerRecorder(calls), MethodRecorder(calls, "method"), EventRecorder(calls)]
    train(tiny_config({"name": name, "trainer": {"max_duration": "6ba", "log_interval": 2},
                       "eval": {"interval": "3ba"}}), extra_callbacks=callbacks)
    return calls


def test_dispatches_the_same_calls_in_the_same_order_as_composers_engine(tiny_config, monkeypatch):
    lean = _recorded_run(tiny_config, "engine-lean")
    monkeypatch.setattr(workbench.trainer, "make_lean", lambda engine: engine)
    composers = _recorded_run(tiny_config, "engine-composer")
    assert ("method", "after_loss", 0) in lean and ("logger", "batch_end", 6) in lean
    assert {value for _, value, _ in lean} >= {"eval_start", "batch_checkpoint", "fit_end"}
    assert lean == composers


def test_the_trainer_runs_the_lean_engine(tiny_config, tmp_path):
    built = build_run(tiny_config({"name": "engine-kind"}), run_dir=tmp_path / "run")
    try:
        assert type(built.trainer.engine) is LeanEngine
    finally:
        built.trainer.close()


def test_a_callback_added_after_the_first_events_is_dispatched_to(tiny_config, tmp_path):
    calls: list = []

    class AddLater(Callback):
        def batch_end(self, state, logger) -> None:
            if int(state.timestamp.batch) == 2:
                state.callbacks.append(MethodRecorder(calls, "late"))

    train(tiny_config({"name": "engine-late", "trainer": {"max_duration": "4ba"}}), run_dir=tmp_path / "run",
          extra_callbacks=[AddLater()])
    assert [call[1:] for call in calls] == [("after_loss", 2), ("batch_end", 3), ("after_loss", 3), ("batch_end", 4)]


def test_acts_on_only_what_a_callback_overrides():
    recorder = MethodRecorder([], "x")
    assert acts_on(recorder, Event.BATCH_END) and acts_on(recorder, Event.AFTER_LOSS)
    assert not acts_on(recorder, Event.BEFORE_FORWARD)
    assert all(acts_on(EventRecorder([]), event) for event in Event)
    plain = Callback()
    assert not any(acts_on(plain, event) for event in Event)
    plain.before_forward = lambda state, logger: None  # an instance attribute counts
    assert acts_on(plain, Event.BEFORE_FORWARD) and not acts_on(plain, Event.AFTER_FORWARD)


@pytest.mark.parametrize("why", ["string", "debug", "profiler", "init"])
def test_composers_run_event_keeps_the_cases_it_must(tiny_config, tmp_path, monkeypatch, why):
    built = build_run(tiny_config({"name": f"engine-{why}"}), run_dir=tmp_path / "run")
    engine = built.trainer.engine
    seen = []
    monkeypatch.setattr(Engine, "run_event", lambda self, event: seen.append(event) or {})
    try:
        event: Event | str = Event.BATCH_START
        if why == "string":
            event = "batch_start"
        elif why == "debug":
            monkeypatch.setenv("ENGINE_DEBUG", "1")
        elif why == "profiler":
            monkeypatch.setattr(engine.state, "profiler", object())
        else:
            event = Event.INIT
        engine.run_event(event)
        assert seen == [event]
        monkeypatch.delenv("ENGINE_DEBUG", raising=False)
        if why != "profiler":  # and the ordinary case does not
            engine.run_event(Event.BATCH_START)
            assert seen == [event]
    finally:
        monkeypatch.undo()
        built.trainer.close()


# LeanEngine.run_event mirrors these Composer 0.32.1 methods: an upgrade must re-read them (workbench/engine.py).
MIRRORED = {
    (Engine, "run_event"): "7a6db86fd36677a9",
    (Engine, "_run_callbacks"): "041f89c2886d307e",
    (Engine, "_run_loggers"): "4ac13232cb087eff",
    (Engine, "_run_nonlogger_callbacks"): "87d978492cad01b3",
    (Engine, "_assert_dataloader_and_duration_set"): "fc2613d259e95a21",
    (Callback, "run_event"): "bb713e6da48fc530",
}


def test_composer_methods_mirrored_by_the_lean_engine_are_unchanged():
    digests = {(owner, name): hashlib.sha256(inspect.getsource(getattr(owner, name)).encode()).hexdigest()[:16]
               for owner, name in MIRRORED}
    assert digests == MIRRORED, "Composer changed code workbench/engine.py mirrors: re-read it, then update"


# --- callbacks changed while events run (found by a hostile review) ------------------------------------------------
def _dispatch(callbacks: list, algorithms: list, events: list[Event], lean: bool) -> None:
    import torch
    from composer.core import State
    from composer.devices import DeviceCPU
    from composer.loggers import Logger
    from composer.models import ComposerClassifier

    from workbench.engine import make_lean

    loader = torch.utils.data.DataLoader([(torch.zeros(2), 0)])
    state = State(model=ComposerClassifier(torch.nn.Linear(2, 2), num_classes=2), rank_zero_seed=0, run_name="x",
                  device=DeviceCPU(), dataloader=loader, dataloader_label="train", max_duration="1ep",
                  callbacks=callbacks, algorithms=algorithms)
    engine = Engine(state, Logger(state))
    if lean:
        make_lean(engine)
    for event in events:
        engine.run_event(event)
    engine.close()


class Named(Callback):
    def __init__(self, calls: list, name: str) -> None:
        self.calls, self.name = calls, name

    def batch_end(self, state, logger) -> None:
        self.calls.append(self.name)


class NamedLogger(LoggerDestination):
    def __init__(self, calls: list, name: str) -> None:
        super().__init__()
        self.calls, self.name = calls, name

    def batch_end(self, state, logger) -> None:
        self.calls.append(self.name)


def _added_by_an_algorithm(calls: list) -> tuple[list, list]:
    from composer.core import Algorithm

    class AddOnce(Algorithm):
        added = False

        def match(self, event, state) -> bool:
            return event is Event.BATCH_END and not self.added

        def apply(self, event, state, logger) -> None:
            self.added = True
            state.callbacks.append(Named(calls, "added"))

    return [Named(calls, "first")], [AddOnce()]


def _logger_removed_by_a_callback(calls: list) -> tuple[list, list]:
    removed = NamedLogger(calls, "logger")

    class Remove(Callback):
        def batch_end(self, state, logger) -> None:
            calls.append("remover")
            if removed in state.callbacks:
                state.callbacks.remove(removed)

    return [Remove(), removed], []


def _replaced_by_a_new_instance(calls: list) -> tuple[list, list]:
    old = Named(calls, "old")

    class Replace(Callback):
        def batch_end(self, state, logger) -> None:
            if old in state.callbacks:
                state.callbacks[state.callbacks.index(old)] = Named(calls, "new")

    return [Replace(), old], []


@pytest.mark.parametrize("scenario", [_added_by_an_algorithm, _logger_removed_by_a_callback,
                                      _replaced_by_a_new_instance])
def test_callbacks_changed_during_an_event_are_dispatched_to_as_composer_does(scenario):
    seen = {}
    for lean in (False, True):
        calls: list = []
        callbacks, algorithms = scenario(calls)
        _dispatch(callbacks, algorithms, [Event.BATCH_END, Event.BATCH_END], lean)
        seen[lean] = calls
    assert seen[True] == seen[False] and len(seen[False]) >= 2
