"""One device resolver (workbench/devices.py) and the same device names in every command and in trainer.device."""

from __future__ import annotations

import argparse
import importlib

import pytest
import torch

from workbench.config import ConfigError, config_from_dict
from workbench.devices import DEVICE_CHOICES, composer_device, resolve_device


def test_resolve_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == "cpu"
    for choice in ("cuda", "gpu"):
        with pytest.raises(ConfigError, match=f"command line: --device: {choice} requested but no CUDA device"):
            resolve_device(choice)
    with pytest.raises(ConfigError, match="cuda:0 requested but no CUDA device"):
        resolve_device("cuda:0")
    with pytest.raises(ConfigError, match=r"config: trainer\.device: expected one of auto, cpu, cuda, gpu"):
        resolve_device("tpu", "config", "trainer.device")


def test_resolve_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("gpu") == "cuda"
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"  # as the harness passes it
    assert composer_device("cuda") == "gpu" and composer_device("cpu") == "cpu"


def test_every_command_takes_the_same_device_names() -> None:
    """eval took auto/cpu/gpu, bench auto/cpu/cuda, generate all four: now all four everywhere."""
    from workbench.cli import COMMANDS

    with_device = []
    for name, (module_name, _) in COMMANDS.items():
        parser = argparse.ArgumentParser()
        importlib.import_module(module_name).add_arguments(parser)
        for action in parser._actions:
            if "--device" in action.option_strings:
                with_device.append(name)
                assert tuple(action.choices) == DEVICE_CHOICES, name
    assert {"eval", "generate", "bench"} <= set(with_device)


def test_trainer_device_takes_the_same_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from workbench.train import _device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for choice, composer_name in (("cuda", "gpu"), ("gpu", "gpu"), ("cpu", "cpu"), ("auto", "gpu")):
        assert _device(config_from_dict({"trainer": {"device": choice}})) == composer_name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer\.device: cuda requested but no CUDA device"):
        _device(config_from_dict({"trainer": {"device": "cuda"}}))
