"""train.precision: the networks' layers in bfloat16, the probabilistic arithmetic in float32."""

import pyro
import pytest
import torch
from torch import nn

from common import CONTRACT, entry_and_batches, tiny_config, trainer_loss
from pyrossl import precision, runs
from pyrossl.errors import ConfigError
from pyrossl.precision import layers, networks_in, resolve
from pyrossl.train import train

#: the largest relative difference allowed between an entry's fp32 and bf16 loss on one batch (the
#: tiny entries measure 1e-6 to 2e-4: bfloat16 keeps 8 bits of each product's mantissa)
LOSS_TOLERANCE = 1e-3


@pytest.fixture
def every_layer(monkeypatch):
    """Every layer in bf16, however small (the tiny test networks are far below MIN_BF16_MACS)."""
    monkeypatch.setattr(precision, "MIN_BF16_MACS", 0)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_bf16_and_fp32_losses_of_every_entry_agree_on_a_batch(name, every_layer):
    torch.manual_seed(0)
    entry, batches = entry_and_batches(name)
    for args in batches:
        losses = {}
        for p in ("fp32", "bf16"):
            pyro.set_rng_seed(3)
            entry.zero_grad()
            with networks_in(entry, p):
                loss = trainer_loss(entry, args)
            assert loss.dtype == torch.float32
            loss.backward()
            grads = [q.grad for q in entry.parameters() if q.grad is not None]
            assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
            losses[p] = loss.item()
        assert losses["bf16"] == pytest.approx(losses["fp32"], rel=LOSS_TOLERANCE), losses
        assert losses["bf16"] != losses["fp32"]  # the layers did run in bfloat16


def test_a_layer_computes_in_bf16_and_hands_back_fp32_and_the_module_is_left_as_it_was(every_layer):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 5), nn.Softplus(), nn.Linear(5, 3))
    x = torch.randn(4, 7)
    seen = []
    net[1].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"))))
    with networks_in(net, "bf16"):
        out = net(x)
    first = nn.functional.linear(x.bfloat16(), net[0].weight.bfloat16(), net[0].bias.bfloat16()).float()
    expected = nn.functional.linear(
        nn.functional.softplus(first).bfloat16(), net[2].weight.bfloat16(), net[2].bias.bfloat16()
    ).float()
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert seen == [(torch.float32, False)]  # the activation between the layers: float32, outside autocast
    assert not torch.is_autocast_enabled("cpu")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in (net[0], net[2]))
    assert torch.equal(net(x), nn.Sequential(*net)(x)) and net(x).dtype == torch.float32
    with networks_in(net, "fp32"):
        assert torch.equal(net(x), net(x.clone()))


def test_autocast_is_switched_off_whatever_ends_a_layer(every_layer):
    class Fails(nn.Linear):
        error = RuntimeError

        def forward(self, x):
            raise self.error("inside the layer")

    layer = Fails(3, 2)
    with networks_in(layer, "bf16"):
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 3))
        assert not torch.is_autocast_enabled("cpu")  # the after-hook ran (always_call)
    Fails.error = KeyboardInterrupt  # skips PyTorch's always-called hooks: the block closes what is open
    with pytest.raises(KeyboardInterrupt):
        with networks_in(layer, "bf16"):
            layer(torch.randn(2, 3))
    assert not torch.is_autocast_enabled("cpu")


def test_a_product_too_small_to_gain_stays_fp32():
    big, small = nn.Linear(512, 256), nn.Linear(16, 32)
    rows = precision.MIN_BF16_MACS // (512 * 256)
    assert precision.worth_bf16(big, (torch.randn(rows, 512),))
    assert not precision.worth_bf16(big, (torch.randn(rows - 1, 512),))
    assert precision.worth_bf16(big, (torch.randn(2, rows // 2, 512),))  # rows over every leading dimension
    assert precision.worth_bf16(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 2, 2),))  # convolutions always
    x = torch.randn(8, 16)
    with networks_in(small, "bf16"):
        assert torch.equal(small(x), nn.functional.linear(x, small.weight, small.bias))  # float32 throughout
        assert not torch.is_autocast_enabled("cpu")


def test_layers_are_the_parameterised_leaves_and_keep_fp32_exempts_a_subtree():
    exempt = nn.Sequential(nn.Linear(2, 2))
    exempt.keep_fp32 = True
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten()), exempt)
    assert list(layers(net)) == [net[0], net[2][0]]


def test_auto_is_bf16_where_the_device_computes_it_natively(monkeypatch):
    assert resolve("fp32", torch.device("cpu")) == "fp32" and resolve("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert resolve("auto", torch.device("cpu")) == "fp32"  # bfloat16 emulated through float32: slower
    for flag in precision.BF16_CPU_FLAGS:
        monkeypatch.setattr(precision, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        assert resolve("auto", torch.device("cpu")) == "bf16"
    # CUDA: asked of torch, native bf16 only (Ampere and later), never emulated
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native in (True, False):
        monkeypatch.setattr(
            torch.cuda,
            "is_bf16_supported",
            lambda including_emulation=True, n=native: asked.append(including_emulation) or n,
        )
        assert resolve("auto", torch.device("cuda", 0)) == ("bf16" if native else "fp32")
    assert asked == [False, False]
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve("fp16", torch.device("cpu"))


def test_the_cpu_flags_are_read_from_proc_cpuinfo():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
    assert flags == frozenset(line.partition(":")[2].split()) and "fpu" in flags


def test_a_bf16_run_records_its_precision_and_resumes_to_the_same_numbers(tmp_path, every_layer):
    same = {"train.precision": "bf16", "data.binarize": True, "train.diagnose_every": 1}
    config = tiny_config(**same, **{"train.epochs": 3})
    assert train(config, tmp_path / "full")["precision"] == "bf16"
    # stopped after two epochs, then resumed to three (the same recipe: bf16 again)
    train(tiny_config(**same, **{"train.epochs": 2}), tmp_path / "part")
    (tmp_path / "part" / runs.CONFIG).write_text((tmp_path / "full" / runs.CONFIG).read_text())
    assert train(config, tmp_path / "part", resume=True)["precision"] == "bf16"
    full, part = (runs.load_checkpoint(tmp_path / d / runs.CHECKPOINT)["model"] for d in ("full", "part"))
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)
    assert all(v.dtype == torch.float32 for v in full.values() if v.is_floating_point())  # checkpoints: float32
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]  # noqa: E731
    assert strip(runs.read_metrics(tmp_path / "full")) == strip(runs.read_metrics(tmp_path / "part"))


def test_auto_records_what_it_ran_and_a_bad_precision_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())
    assert train(tiny_config(**{"train.precision": "auto", "train.epochs": 1}), tmp_path / "a")["precision"] == "fp32"
    with pytest.raises(ConfigError, match="train.precision must be one of fp32, bf16, auto, not 'fp16'"):
        tiny_config(**{"train.precision": "fp16"})
