"""The command line: `python -m skyrt_demo.train --out DIR [...]`, one flag per TrainConfig field."""
from __future__ import annotations

import argparse
import dataclasses

from .config import PROG, TrainConfig, flag, validate
from .model_card import CARD_NAME
from .model_folder import folder_bytes
from .trainer import Trainer


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a command line (checked: bad settings raise ValueError naming the flag)."""
    p = argparse.ArgumentParser(prog=PROG, description="train skyrt's demo model on the procedural world (CPU)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        if isinstance(value, bool):  # a switch: --foo when it is off by default, --no-foo when on
            if value:
                p.add_argument("--no-" + flag(f.name)[2:], dest=f.name, action="store_false")
            else:
                p.add_argument(flag(f.name), dest=f.name, action="store_true")
        else:
            p.add_argument(flag(f.name), dest=f.name, type=type(value), default=value, help=f"default {value}")
    args = p.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Train, export and report where the model folder went."""
    cfg = parse_args(argv)
    model_dir = Trainer(cfg).run()
    print(f"wrote {model_dir} ({folder_bytes(model_dir) / 2**20:.1f} MiB); card: {model_dir / CARD_NAME}")
    return 0
