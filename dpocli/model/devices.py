"""`--device` as a torch device, checked before anything is loaded (one line naming the flag)."""

from __future__ import annotations

import torch

from dpocli.errors import DpocliError


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DpocliError(f"'{name}' is not a device torch knows", field="--device",
                          hint="use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DpocliError("CUDA was requested but no GPU is available", field="--device",
                              hint="use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DpocliError(f"there is no GPU {device.index} (found {torch.cuda.device_count()})",
                              field="--device")
    elif device.type != "cpu":
        accel = getattr(torch, device.type, None)
        if accel is None or not getattr(accel, "is_available", lambda: False)():
            raise DpocliError(f"'{name}' is not available on this machine", field="--device",
                              hint="use --device cpu")
    return device
