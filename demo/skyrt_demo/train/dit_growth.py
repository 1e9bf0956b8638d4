"""Growing a trained DiT deeper without changing what it computes (`--dit-init` with more layers)."""
from __future__ import annotations

import torch

from skyrt.export.dit import WanDiT

GROWN_ZERO = ("self_attn.o", "cross_attn.o", "ffn.2")  # a block with these zero adds nothing to the residual


def grown_dit_state(init: dict[str, torch.Tensor], fresh: WanDiT) -> dict[str, torch.Tensor]:
    """`init` (a trained DiT's state, L blocks) in `fresh`'s deeper layout (k L blocks), computing the same
    function: the trained blocks go to positions 0, k, 2k, ...; each block between them keeps `fresh`'s
    random weights with its output projections zeroed, so it is the identity until training moves them
    (their gradients are not zero: the projections' inputs are live). Growing capacity this way keeps
    what the shallower model learned instead of training the deeper one from scratch."""
    old_layers = 1 + max(int(k.split(".")[1]) for k in init if k.startswith("blocks."))
    new_layers = len(fresh.blocks)
    if new_layers % old_layers:
        raise ValueError(f"--dit-init has {old_layers} blocks: --dit-layers {new_layers} must be a multiple of it")
    ratio = new_layers // old_layers
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    for key, value in init.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            state[f"blocks.{int(index) * ratio}.{rest}"] = value.clone()
        else:
            state[key] = value.clone()
    for block in range(new_layers):
        if block % ratio:
            for name in GROWN_ZERO:
                state[f"blocks.{block}.{name}.weight"].zero_()
                state[f"blocks.{block}.{name}.bias"].zero_()
            # The shared time projection adds to every block's modulation: start from the trained
            # neighbour's, so the new block's norms see the scales the trained blocks see.
            state[f"blocks.{block}.modulation"] = init[f"blocks.{block // ratio}.modulation"].clone()
    return state
