"""The GPU-only settings, exercised on the CPU wherever the CPU supports them (issue 17): flash-attn's dispatch and
tensor layout through a stand-in kernel, bf16 autocast of the model and every objective's loss, DataLoader workers,
``model.compile: true`` end to end (train, evaluate, checkpoint, resume exactly), and a clear refusal of AMP
precisions Composer cannot run on a CPU."""

from __future__ import annotations

import time

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from composer.core import Callback

import workbench.model
from workbench.bench import VocabIds
from workbench.config import ConfigError, config_from_dict
from workbench.model import Transformer, TransformerConfig
from workbench.results import read_metrics, read_summary
from workbench.train import build_model, train

# --- flash-attn ---------------------------------------------------------------------------------------------------
BATCH, LENGTH, HEADS, HEAD_DIM = 3, 10, 4, 16  # all different: a transposed layout cannot pass the shape check


class FlashStandIn:
    """``flash_attn_func`` with flash-attn's contract checked: q, k, v (B, L, H, D), one half-precision dtype, unit
    stride in the head dimension; computed with SDPA."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        for t in (q, k, v):
            assert t.shape == (BATCH, LENGTH, HEADS, HEAD_DIM), f"not flash-attn's (B, L, H, D) layout: {t.shape}"
            assert t.dtype == q.dtype in (torch.float16, torch.bfloat16), t.dtype
            assert t.stride(-1) == 1, "flash-attn needs the head dimension contiguous"
        self.calls.append({"causal": causal, "dropout_p": dropout_p, "dtype": q.dtype})
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)  # flash-attn returns (B, L, H, D)


@pytest.fixture
def flash(monkeypatch) -> FlashStandIn:
    stand_in = FlashStandIn()
    monkeypatch.setattr(workbench.model, "flash_attn_func", stand_in)
    monkeypatch.setattr(workbench.model, "FLASH_DEVICES", ("cpu",))
    return stand_in


def _net(attention: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=200, max_seq_len=LENGTH, n_layers=2, d_model=HEADS * HEAD_DIM,
                                         n_heads=HEADS, attention=attention))


@pytest.mark.parametrize("causal", [True, False])
def test_flash_path_matches_sdpa_under_bf16_autocast(flash, causal):
    tokens = torch.randint(0, 200, (BATCH, LENGTH))
    flash_net, sdpa_net = _net("auto"), _net("sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        via_flash, via_sdpa = flash_net(tokens, causal=causal), sdpa_net(tokens, causal=causal)
    assert [c["causal"] for c in flash.calls] == [causal, causal]  # one call per layer, the mask kind passed on
    assert flash.calls[0]["dtype"] == torch.bfloat16
    torch.testing.assert_close(via_flash.float(), via_sdpa.float(), atol=2e-2, rtol=2e-2)
    via_flash.float().sum().backward()  # the gradient flows back through the layout transposes
    assert flash_net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_flash_is_used_only_where_it_can_run(flash):
    tokens = torch.randint(0, 200, (BATCH, LENGTH))
    _net("auto")(tokens)  # fp32: flash-attn has no fp32 kernel
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _net("sdpa")(tokens)  # asked for SDPA
        mask = torch.ones(BATCH, 1, LENGTH, LENGTH, dtype=torch.bool).tril()
        _net("flash")(tokens, attn_mask=mask)  # an explicit (prefix-LM) mask: SDPA
        assert flash.calls == []
        _net("flash")(tokens)
    assert len(flash.calls) == 2


def test_flash_receives_the_attention_dropout_in_training_only(flash):
    net = _net("auto")
    for block in net.blocks:
        block.attn.attn_dropout.p = 0.1
    tokens = torch.randint(0, 200, (BATCH, LENGTH))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(tokens)
        net.eval()
        net(tokens)
    assert [c["dropout_p"] for c in flash.calls] == [0.1, 0.1, 0.0, 0.0]


# --- bf16 autocast of the objectives --------------------------------------------------------------------------------
OBJECTIVES = {"ar": {}, "mdm": {"objective": {"name": "mdm"}},
              "dual": {"objective": {"name": "dual", "dual": {"ar_fraction": 0.5, "mode": "sequences"}}},
              "prefix_lm": {"objective": {"name": "prefix_lm"}}}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_losses_under_cpu_bf16_autocast_match_fp32(objective):
    """Composer 0.32.1 runs amp_bf16 only on CUDA, so the model and loss are run under CPU autocast directly, as
    Composer's bf16 context runs them on a GPU. Tolerance: 0.03 nats on a loss of ~5.3 (bf16 keeps 8 mantissa
    bits; the softmax/NLL reductions stay fp32), gradients within 0.5% in direction."""
    config = config_from_dict({"data": {"seq_len": 32}, "model": {"n_layers": 2, "d_model": 64, "n_heads": 2},
                               **OBJECTIVES[objective]}, "test")
    torch.manual_seed(0)
    model = build_model(config, VocabIds(vocab_size=200, eos_id=0, mask_id=199), install_objective=True)
    tokens = torch.randint(1, 199, (8, 32))

    def loss_and_grad(autocast: bool) -> tuple[float, torch.Tensor]:
        torch.manual_seed(1)  # the same diffusion times, masks and prefix lengths
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model.loss(model({"tokens": tokens, "index": torch.arange(8)}), {})
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    fp32, grad32 = loss_and_grad(False)
    bf16, grad16 = loss_and_grad(True)
    assert abs(bf16 - fp32) < 0.03, (fp32, bf16)
    assert F.cosine_similarity(grad16.float(), grad32, dim=0) > 0.995


def test_amp_precision_on_cpu_is_refused_before_any_work(tiny_config, results_root):
    """Composer refuses any AMP precision on a CPU device, after the data are prepared and the model built; the
    config says so first, in one line naming the key."""
    config = tiny_config({"name": "bf16-on-cpu", "trainer": {"precision": "amp_bf16"}})
    with pytest.raises(ConfigError, match=r"trainer\.precision: amp_bf16 needs a GPU"):
        train(config)
    assert not (results_root / "bf16-on-cpu").exists()


# --- DataLoader workers ---------------------------------------------------------------------------------------------
def test_loader_workers_yield_the_in_process_batches(tiny_config, tmp_path):
    from datasets_prep.corpus import prepare
    from workbench.data import build_loader

    prepared = prepare(tiny_config().data, log=lambda _: None)
    epochs = {}
    for workers in (0, 2):
        spec = build_loader(prepared.train.path, 16, shuffle=True, seed=3, num_workers=workers,
                            view=tmp_path / f"view{workers}")
        epochs[workers] = [[b["tokens"], b["index"]] for _ in range(2) for b in spec.dataloader]  # two epochs
    assert len(epochs[0]) == 64
    for in_process, from_workers in zip(epochs[0], epochs[2], strict=True):
        assert in_process[0].dtype == from_workers[0].dtype == in_process[1].dtype == torch.int64
        assert torch.equal(in_process[0], from_workers[0]) and torch.equal(in_process[1], from_workers[1])


def test_worker_batches_reach_the_training_process_without_file_descriptor_passing(tiny_config, tmp_path,
                                                                                   monkeypatch):
    """A tensor from a worker arrives as a shared-memory file descriptor, each costing the training loop's thread
    an authenticated socket connection (~0.2 ms, workbench.data.TokenLoader); numpy batches travel pickled."""
    from multiprocessing import resource_sharer

    from datasets_prep.corpus import prepare
    from workbench.data import build_loader

    received = []
    original = resource_sharer.DupFd.detach  # how the receiving process takes a passed descriptor
    monkeypatch.setattr(resource_sharer.DupFd, "detach", lambda self: received.append(1) or original(self))
    prepared = prepare(tiny_config().data, log=lambda _: None)
    spec = build_loader(prepared.train.path, 16, shuffle=True, seed=3, num_workers=2, view=tmp_path / "view")
    batches = list(spec.dataloader)
    assert len(batches) == 32 and all(isinstance(b["tokens"], torch.Tensor) for b in batches)
    assert not received, f"{len(received)} tensors arrived through file descriptors"


# --- torch.compile end to end ---------------------------------------------------------------------------------------
class CrashAt(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            raise RuntimeError("simulated crash")


def _rows(run_dir) -> pl.DataFrame:
    frame = read_metrics(run_dir / "metrics.parquet")
    return frame.filter(pl.col("metric") != "tokens_per_s").select(
        ["step", "tokens_seen", "split", "metric", "value"]).sort(["step", "split", "metric"])


@pytest.mark.slow
def test_compiled_model_trains_evaluates_checkpoints_and_resumes_exactly(tiny_config, results_root):
    """Inductor on the CPU (one 1-layer shape; ~1 min on 2 busy cores, most of it the first compilation: the
    second run hits the compile cache)."""
    overrides = {"model": {"n_layers": 1, "d_model": 32, "n_heads": 2, "compile": True},
                 "eval": {"interval": "6ba"},
                 "trainer": {"max_duration": "6ba", "log_interval": 1, "checkpoint_interval": "3ba"}}
    started = time.time()
    straight = tiny_config({**overrides, "name": "compiled-straight"})
    train(straight)
    assert read_summary(results_root / straight.name)["status"] == "complete"
    resumed = tiny_config({**overrides, "name": "compiled-resumed"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(resumed, extra_callbacks=[CrashAt(5)])
    train(resumed, resume=True)
    one, other = _rows(results_root / straight.name), _rows(results_root / resumed.name)
    assert set(one.filter(pl.col("split") == "val")["metric"]) >= {"ar_nll"}
    assert one.filter(pl.col("split") == "train")["step"].to_list() == [1, 2, 3, 4, 5, 6]
    assert one.equals(other), f"{one}\n{other}"
    print(f"compiled train + resume: {time.time() - started:.0f} s")
