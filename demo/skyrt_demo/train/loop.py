"""What every step loop of the trainer shares: the learning-rate schedule, the EMA, the progress bar,
the run's log (OUT/train_log.jsonl) and the loss summaries the model card prints."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)


def log_record(out: Path, record: dict) -> None:
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def head_mean(values: list[float], n: int = 50) -> float | None:
    return float(np.mean(values[:n])) if values else None


def tail_mean(values: list[float], n: int = 50) -> float | None:
    return float(np.mean(values[-n:])) if values else None
