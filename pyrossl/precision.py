"""Mixed precision for the zoo's networks: matrix products in bfloat16, everything probabilistic in float32.

``train.precision = "bf16"`` runs every *layer* of an entry's networks under
``torch.autocast(device, torch.bfloat16)`` and hands its output back in float32:

    y = float32( W_bf16 x_bf16 + b_bf16 )        for each Linear, Conv or ConvTranspose layer

so the matrix products and convolutions, which hold nearly all the arithmetic, run on the device's
bfloat16 units (AMX or AVX-512 BF16 on CPUs, tensor cores on GPUs), while every other operation
keeps float32, exactly as in an fp32 run:

- the activations between layers and the heads' softplus scales (their inputs are float32 again);
- every log-density Pyro scores (the Bernoulli pixels, the Gaussian codes, the categorical label),
  the closed-form and Monte Carlo KL terms, the flows' log-determinants;
- the enumeration sums of ``TraceEnum_ELBO`` (log-sum-exps and the contractions over enumerated
  sites) and every reduction of the loss (sums over pixels, units and plates, batch means).

Why per layer and not autocast around the whole loss: under one autocast region the layers' bfloat16
outputs flow into the distributions, so log-densities, KLs and their sums are computed with an 8-bit
mantissa (a loss of -100 nats is then resolved to 0.5 nats), and Pyro's enumeration contracts
float32 and bfloat16 factors with ``tensordot``, which refuses mixed dtypes (measured: M2 ``enum``
fails with "both inputs should have same dtype"). Which outputs parameterise a distribution is the
entry's business (its networks are called through methods, not only ``forward``), so the boundary is
drawn where it is always right: at each layer. The price is one cast per layer output, small beside
the product it follows.

Parameters, gradients and optimiser states stay float32 (autocast casts a weight for its product
only), so checkpoints are float32 and a run resumed under the same precision ends with the same
numbers. A module (and everything below it) that must stay float32 says so with a ``keep_fp32 = True``
attribute. ``auto`` is bf16 where the device computes bfloat16 natively and fp32 elsewhere
(:func:`resolve`); the run records what it used (``summary.json``'s ``precision``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from pyrossl.config import PRECISIONS

#: CPU flags (Linux ``/proc/cpuinfo``) of bfloat16 arithmetic in hardware: Intel AMX tiles, AVX-512 BF16
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: nothing is assumed)."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def runs_bf16_natively(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 products in hardware: a CUDA device with bf16 (Ampere and
    later), or a CPU with AMX-BF16 or AVX-512 BF16. Elsewhere bfloat16 is emulated through float32
    and is slower than float32, so ``auto`` keeps fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def resolve(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``train.precision`` means on ``device`` (``auto``: bf16 where native)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if runs_bf16_natively(device) else "fp32"
    return precision


def layers(module: nn.Module) -> Iterator[nn.Module]:
    """The modules whose forward computes with their own parameters and calls no other module (Linear,
    Conv, Pyro's masked autoregressive layers, ...), outside any subtree marked ``keep_fp32``."""
    stack = [module]
    while stack:
        m = stack.pop()
        if getattr(m, "keep_fp32", False):
            continue
        children = list(m.children())
        if not children and next(m.parameters(recurse=False), None) is not None:
            yield m
        stack.extend(reversed(children))


def _to_fp32(output):
    if isinstance(output, torch.Tensor):
        return output.float() if output.dtype == torch.bfloat16 else output
    if isinstance(output, tuple | list):
        return type(output)(_to_fp32(o) for o in output)
    return output


#: a linear layer's product below this many multiply-adds stays float32: the casts around it (input,
#: weight, bias, output, and their backward) and the hooks cost a fixed ~0.15 ms, more than bfloat16
#: saves on a small product (measured on 2 cores, fwd + bwd: 16 -> 400 on 2,000 rows 1.24x the fp32
#: time; 50 -> 500 on 1,000 rows 0.95x; 784 -> 400 on 100 rows 0.82x, on 1,000 rows 0.57x)
MIN_BF16_MACS = 1 << 24


def worth_bf16(module: nn.Module, args: tuple) -> bool:
    """Whether ``module`` called on ``args`` does enough arithmetic to gain from bfloat16: for a
    ``Linear`` (Pyro's masked layers included), rows x in x out >= :data:`MIN_BF16_MACS`; other layers
    (convolutions: many products per weight) always."""
    if isinstance(module, nn.Linear) and args and isinstance(args[0], torch.Tensor):
        x = args[0]
        return x.numel() // max(1, x.shape[-1]) * module.weight.numel() >= MIN_BF16_MACS
    return True


class _LayerAutocast:
    """The two hooks of one layer: autocast on before its forward, off after it, the output cast back."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.open: list[torch.autocast | None] = []

    def before(self, module, args):
        region = torch.autocast(self.device_type, dtype=torch.bfloat16) if worth_bf16(module, args) else None
        if region is not None:
            region.__enter__()
        self.open.append(region)

    def after(self, module, args, output):
        # called even when the forward raised (always_call): autocast never stays switched on
        region = self.open.pop()
        if region is None:
            return None
        region.__exit__(None, None, None)
        return _to_fp32(output)


@contextlib.contextmanager
def networks_in(module: nn.Module, precision: str, device: torch.device | str = "cpu"):
    """Within the block, every layer of ``module`` (see :func:`layers`) computes in ``precision``
    (``fp32``: nothing changes; ``bf16``: autocast per layer, float32 outputs); the hooks are removed
    on leaving it, so the module is as it was.

    >>> with networks_in(entry, "bf16"):            # doctest: +SKIP
    ...     loss = entry.elbo.differentiable_loss(entry.model, entry.guide, x)
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16 here (resolve 'auto' first), not {precision!r}")
    if precision == "fp32":
        yield module
        return
    hooks = _LayerAutocast(torch.device(device).type)
    handles = []
    try:
        for layer in layers(module):
            handles.append(layer.register_forward_pre_hook(hooks.before))
            handles.append(layer.register_forward_hook(hooks.after, always_call=True))
        yield module
    finally:
        for handle in handles:
            handle.remove()
        # a KeyboardInterrupt inside a layer skips its after-hook (PyTorch runs always_call hooks for an
        # Exception only): close what it left open, so autocast does not stay on in this thread
        while hooks.open:
            region = hooks.open.pop()
            if region is not None:
                region.__exit__(None, None, None)
