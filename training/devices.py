"""Device selection: one policy for training, evaluation, audits and serving.

- ``"auto"``: the GPU (``cuda:LOCAL_RANK`` under torchrun) when CUDA is available, else the CPU.
  This is how every GPU path falls back to the CPU on a machine without one.
- an explicit device (``"cpu"``, ``"cuda"``, ``"cuda:1"``): exactly that one; asking for CUDA where
  there is none is an error (:class:`DeviceUnavailable`) rather than a silent move to the CPU, which
  would run 10-100x slower than the operator planned for.
"""

from __future__ import annotations

import torch

from training.errors import ErcError


class DeviceUnavailable(ErcError):
    """The requested device does not exist on this machine."""


def resolve_device(preference: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` for ``preference`` under the policy above.

    Args:
        preference: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a ``torch.device``).
        local_rank: the GPU index that ``"auto"`` and a bare ``"cuda"`` mean (torchrun's LOCAL_RANK).
    """
    if str(preference) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    name = str(preference)
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise DeviceUnavailable(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device {name!r} requested but CUDA is not available here")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        elif device.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif device.type != "cpu":
        raise DeviceUnavailable(f"device {name!r}: only cpu and cuda are supported")
    return device


__all__ = ["DeviceUnavailable", "resolve_device"]
