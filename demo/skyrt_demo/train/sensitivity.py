"""How much a DiT's prediction on the shape depends on each word of the prompt (the model card's
"prompt sensitivity", and the probe's)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from skyrt.export.dit import WanDiT

from .. import world as W
from .data import LatentData

SENSITIVITY_SIGMAS = (0.5, 0.7, 0.85)


def swap_word(attrs: W.Attributes, name: str, rng: np.random.Generator) -> W.Attributes:
    """`attrs` with attribute `name` changed to another value of the world's vocabulary, drawn by `rng`."""
    values = {"shape": W.SHAPES, "colour": tuple(W.COLOURS), "motion": W.MOTIONS, "background": tuple(W.BACKGROUNDS),
              "camera": W.CAMERAS}[name]
    others = [v for v in values if v != getattr(attrs, name)]
    return dataclasses.replace(attrs, **{name: others[int(rng.integers(len(others)))]})


@torch.no_grad()
def prompt_sensitivity(dit: WanDiT, context_of, data: "LatentData", block: int, clips: int = 24,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """How much the DiT's x0 prediction on the shape depends on each word of the prompt.

    For the first causal block of `clips` clips without a prompt switch (a stream's start: no context),
    noised to each of SENSITIVITY_SIGMAS: the x0 MSE on shape latent pixels with one attribute swapped
    for another value, over the MSE with the true prompt. 1.0 means the DiT ignores that word; a model
    that draws what the prompt says has ratios well above 1 for colour and shape.
    `context_of(prompts)` -> text context [B, L, C]. Returns {attribute: {sigma: ratio}}.
    """
    rng = np.random.default_rng(seed)
    index = [i for i in range(len(data.prompts)) if data.switch_latent[i] < 0][:clips]
    x0 = data.latents[index, :, :block].float()  # [B, 16, block, h, w]
    fg = data.fg[index, :block].float()  # [B, block, h, w]
    attrs = [W.parse_prompt(data.prompts[i]) for i in index]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    contexts = {"true": context_of([a.prompt for a in attrs])}
    for name in W.ATTRIBUTE_NAMES:
        contexts[name] = context_of([swap_word(a, name, rng).prompt for a in attrs])
    result: dict[str, dict[str, float]] = {name: {} for name in W.ATTRIBUTE_NAMES}
    for sigma in SENSITIVITY_SIGMAS:
        x_t = (1.0 - sigma) * x0 + sigma * noise
        t = torch.full((len(index), block), 1000.0 * sigma)

        def shape_error(context: torch.Tensor) -> float:
            pred = x_t - sigma * dit(x_t, t, context, causal_block_size=block)  # x0 = x - sigma v
            return float(((pred - x0).square().mean(dim=1) * fg).sum() / fg.sum().clamp_min(1.0))

        true_error = shape_error(contexts["true"])
        for name in W.ATTRIBUTE_NAMES:
            result[name][f"{sigma:g}"] = shape_error(contexts[name]) / true_error
    return result
