"""Model FLOPs utilisation: the model's FLOPs per step against the devices' peak."""

from __future__ import annotations

import jax

from resnet_jax.models.summary import count_macs

# Dense bf16 peak TFLOP/s per device, matched as a substring of `device.device_kind`.
PEAK_TFLOPS = {'H200': 989.0, 'H100': 989.0, 'A100': 312.0, 'L4': 121.0, 'V100': 125.0,
               'TPU v6 lite': 918.0, 'TPU v5p': 459.0, 'TPU v5 lite': 197.0, 'TPU v5': 459.0,
               'TPU v4': 275.0, 'TPU v3': 123.0}


def peak_flops_per_device(config) -> float | None:
    """The peak FLOP/s of one device: config.log.peak_tflops_per_device if set, else the `PEAK_TFLOPS`
    entry of this device kind; None for a device not in the table (MFU is then not reported)."""
    if config.log.peak_tflops_per_device is not None:
        return config.log.peak_tflops_per_device * 1e12
    kind = jax.devices()[0].device_kind
    return next((tflops * 1e12 for name, tflops in PEAK_TFLOPS.items() if name in kind), None)


def model_flops(model, image_size: int, batch_size: int, train: bool = True) -> float:
    """Model FLOPs of one training step: 6 x MACs x batch (forward 2, backward 4 per MAC); of an
    evaluation step (train=False): 2 x MACs x batch.

    Counted from the architecture rather than taken from XLA's cost analysis, which on GPUs
    counts the convolutions handed to cuDNN as zero, and which would count rematerialised
    work as useful: MFU compares the model's FLOPs with the device's peak.
    """
    return (6.0 if train else 2.0) * count_macs(model, image_size) * batch_size


def mfu(flops_per_step: float, step_seconds: float, peak: float | None) -> float | None:
    """The fraction of the device's peak that `flops_per_step` in `step_seconds` reaches; None
    without a known peak or FLOP count."""
    return flops_per_step / step_seconds / peak if peak and flops_per_step else None
