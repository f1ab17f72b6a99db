"""Choosing the device and the mixed-precision context; describing the machine a measurement ran on."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from .errors import DeviceError


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but this machine has no usable CUDA GPU "
                          "(use --device cpu or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} was asked for but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r} is not supported (auto, cpu, cuda, cuda:N)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA for "auto"/"bf16"; None (full fp32) otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype`, or nothing for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(device: str | torch.device | None = None,
                     packages: tuple[str, ...] = ("torch", "torchaudio", "onnxruntime")) -> dict:
    """What a measurement ran on: CPU model and cores, torch threads, the GPU (when `device` is CUDA), the
    versions of `packages` (None: not installed) and the 1/5/15-minute load averages (was the machine shared?)."""
    device = torch.device(device if device is not None else "cpu")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        load = None
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "versions": {name: package_version(name) for name in packages}, "load_average": load}


def machine_line(machine: dict) -> str:
    """describe_machine's dict in one line, e.g. for a results table."""
    threads = machine["torch_threads"]
    parts = [f"{machine['cpu']}, {machine['cores']} cores, torch {threads} thread{'s' if threads != 1 else ''}"]
    if machine["gpu"]:
        parts.insert(0, machine["gpu"])
    parts.append(", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version))
    if machine["load_average"]:
        parts.append(f"load average {machine['load_average'][0]}")
    return "; ".join(p for p in parts if p)
