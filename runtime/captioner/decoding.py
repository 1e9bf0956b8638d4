"""Step 5 of captioning: greedy decoding with the K/V cache over any CaptionerBackend."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from ..caption_schema import MAX_NEW_TOKENS


class CaptionerBackend(Protocol):
    """What the decoding loop needs from an inference backend (onnxruntime: ort_backend.py;
    TensorRT: tensorrt_backend.py)."""

    def vision(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Vision graph feeds (see `vision_inputs`) -> merged features [N / merge^2, hidden]."""

    def empty_cache(self) -> Any:
        """A K/V cache holding nothing (whatever the backend keeps between decoder calls)."""

    def decoder(self, embeds: np.ndarray, position_ids: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """embeds [1, S, hidden], position_ids int64 [3, 1, S], cache of P tokens ->
        (logits float32 [1, vocab] of the last token, cache of P + S tokens)."""


@dataclass
class GenerationResult:
    """Generated token ids (including the stop token, like transformers' generate), the decoded
    text (special tokens removed), why decoding stopped, and timings in seconds."""

    tokens: list[int]
    text: str
    stop_reason: str  # "eos" | "max_new_tokens"
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


def greedy_decode(backend: CaptionerBackend, embeds: np.ndarray, positions: np.ndarray, delta: int,
                  embed_table: np.ndarray, eos_token_ids: Sequence[int],
                  max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[list[int], str, dict[str, float]]:
    """Greedy decoding with the K/V cache: prefill the prompt (embeds [L, hidden], positions [3, L]),
    then feed back each argmax token at position (cache index + delta) on all three axes.

    Returns (tokens, stop reason, timings: prefill_s, decode_s, decode_tokens). Ties go to the
    lowest token id (numpy argmax), as in torch."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    eos = set(int(t) for t in eos_token_ids)
    start = time.perf_counter()
    logits, cache = backend.decoder(embeds[None], positions[:, None, :], backend.empty_cache())
    prefill_s = time.perf_counter() - start
    length = embeds.shape[0]
    tokens: list[int] = []
    reason = "max_new_tokens"
    start = time.perf_counter()
    steps = 0
    while True:
        token = int(np.argmax(logits[0]))
        tokens.append(token)
        if token in eos:
            reason = "eos"
            break
        if len(tokens) >= max_new_tokens:
            break
        position = np.full((3, 1, 1), length + delta, dtype=np.int64)
        logits, cache = backend.decoder(embed_table[token][None, None], position, cache)
        length += 1
        steps += 1
    decode_s = time.perf_counter() - start
    return tokens, reason, {"prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps}

