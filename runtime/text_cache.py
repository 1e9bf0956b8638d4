"""A text-embedding cache on disk: a kiosk cycling prompts never runs the umT5 encoder twice.

Entries are keyed by (encoder hash, prompt, text_len) and stored one `.npz` per prompt in a folder.
The context [1, text_len, d_model] is zero past the prompt's length (TextEncoder semantics), so only
the rows up to the last non-zero one are stored and the zeros are restored on load: an entry is a
few KB to a few hundred KB instead of text_len * d_model * 4 bytes (8 MB for umT5-xxl).

- Writes are atomic (runtime/atomic_file.py): a crash never leaves a half entry.
- Optional bounds (`max_bytes`, `max_entries`) evict least recently used entries (a hit touches the
  file's mtime; eviction drops the oldest mtimes first).
- An unreadable or mismatching entry is re-encoded and rewritten, with a warning.

Use it around any backend: `enable_text_cache(backend, folder)` (or `skyrt.load(..., text_cache=folder)`)
sets `backend.text_cache`, which Backend.encode_text reads through (the backend's methods are not
replaced). Torch-free (numpy only): the backend converts its contexts (Backend.context_to_array /
context_from_array) and names its encoder (Backend.text_encoder_hash).

Run the tests: python -m pytest tests/test_text_cache.py -q
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic_file import write_atomically
from .backends.base import Backend, TextContext

SUFFIX = ".npz"
_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# The cache


class TextEmbeddingCache:
    """Contexts on disk, keyed by (encoder hash, prompt, text_len); see the module docstring."""

    def __init__(self, folder: str | Path, max_bytes: int | None = None, max_entries: int | None = None):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    @staticmethod
    def key(encoder_hash: str, prompt: str, text_len: int) -> str:
        return hashlib.sha256(json.dumps([_FORMAT, encoder_hash, prompt, int(text_len)]).encode()).hexdigest()

    def path(self, encoder_hash: str, prompt: str, text_len: int) -> Path:
        return self.folder / (self.key(encoder_hash, prompt, text_len) + SUFFIX)

    def get(self, encoder_hash: str, prompt: str, text_len: int) -> np.ndarray | None:
        """The cached context [1, text_len, d] float32, or None (a miss; also for a bad entry)."""
        path = self.path(encoder_hash, prompt, text_len)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            context = self._read(path, encoder_hash, prompt, text_len)
        except Exception as err:  # any damage (truncation, garbage, wrong metadata) means: re-encode
            warnings.warn(f"text cache entry {path.name} is unreadable ({type(err).__name__}: {err}); "
                          "re-encoding the prompt", RuntimeWarning, stacklevel=3)
            path.unlink(missing_ok=True)
            self.corrupt += 1
            self.misses += 1
            return None
        try:
            os.utime(path)  # LRU: a hit makes the entry the most recent
        except OSError:
            pass
        self.hits += 1
        return context

    @staticmethod
    def _read(path: Path, encoder_hash: str, prompt: str, text_len: int) -> np.ndarray:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            rows = np.asarray(data["rows"], dtype=np.float32)
        if meta.get("encoder") != encoder_hash or meta.get("prompt") != prompt or meta.get("text_len") != text_len:
            raise ValueError("the entry belongs to another (encoder, prompt, text_len)")
        shape = tuple(meta["shape"])
        if len(shape) != 3 or shape[1] != text_len or rows.ndim != 3 or rows.shape[0] != shape[0] \
                or rows.shape[2] != shape[2] or rows.shape[1] > shape[1]:
            raise ValueError(f"stored rows {rows.shape} do not fit the context shape {shape}")
        context = np.zeros(shape, np.float32)
        context[:, : rows.shape[1]] = rows
        return context

    def put(self, encoder_hash: str, prompt: str, text_len: int, context: np.ndarray) -> Path:
        """Store a context [1, text_len, d] (atomically); evicts old entries past the bounds."""
        context = np.asarray(context, dtype=np.float32)
        if context.ndim != 3 or context.shape[1] != text_len:
            raise ValueError(f"context must be [B, text_len={text_len}, d], got {context.shape}")
        nonzero = np.flatnonzero(np.any(context != 0, axis=(0, 2)))
        used = int(nonzero[-1]) + 1 if len(nonzero) else 0
        meta = {"encoder": encoder_hash, "prompt": prompt, "text_len": int(text_len), "shape": list(context.shape)}
        path = self.path(encoder_hash, prompt, text_len)
        entry = io.BytesIO()
        np.savez(entry, rows=context[:, :used], meta=np.array(json.dumps(meta)))
        write_atomically(path, entry.getvalue())
        self.evict()
        return path

    def entries(self) -> list[Path]:
        return [p for p in self.folder.iterdir() if p.suffix == SUFFIX and not p.name.startswith(".")]

    def evict(self) -> int:
        """Drop least recently used entries until both bounds hold; returns how many went."""
        if self.max_bytes is None and self.max_entries is None:
            return 0
        stats = []
        for p in self.entries():
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            stats.append((st.st_mtime_ns, st.st_size, p))
        stats.sort()
        total = sum(s for _, s, _ in stats)
        removed = 0
        while stats and ((self.max_bytes is not None and total > self.max_bytes)
                         or (self.max_entries is not None and len(stats) > self.max_entries)):
            _, size, path = stats.pop(0)
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed


# ----------------------------------------------------------------------------------------------
# Wrapping a backend


class CachedTextEncoder:
    """A backend's text encoder through a TextEmbeddingCache; counts hits and misses (see `cache`).

    The backend converts its contexts to and from the float32 arrays stored (Backend.context_to_array
    / context_from_array) and names its encoder (Backend.text_encoder_hash, unless `encoder_hash` is
    given). `encode`: what runs on a miss, default backend.encode_text (enable_text_cache passes the
    backend's run_text_encoder, since its encode_text then reads through this wrapper)."""

    def __init__(self, backend: Backend, cache: TextEmbeddingCache | str | Path, encoder_hash: str | None = None,
                 encode: Callable[[str], TextContext] | None = None):
        self.backend = backend
        self.cache = cache if isinstance(cache, TextEmbeddingCache) else TextEmbeddingCache(cache)
        self._encode = encode if encode is not None else backend.encode_text
        self._encoder_hash = encoder_hash

    @property
    def encoder_hash(self) -> str:
        if self._encoder_hash is None:
            self._encoder_hash = self.backend.text_encoder_hash()
        return self._encoder_hash

    @property
    def text_len(self) -> int:
        return self.backend.model.text_len

    def encode_text(self, prompt: str) -> TextContext:
        cached = self.cache.get(self.encoder_hash, prompt, self.text_len)
        if cached is not None:
            return TextContext(prompt=prompt, value=self.backend.context_from_array(cached))
        context = self._encode(prompt)
        self.cache.put(self.encoder_hash, prompt, self.text_len, self.backend.context_to_array(context.value))
        return context


def enable_text_cache(backend: Backend, folder: str | Path | TextEmbeddingCache, max_bytes: int | None = None,
                      max_entries: int | None = None) -> CachedTextEncoder:
    """Make `backend.encode_text` read through an on-disk cache in `folder` (Backend.text_cache);
    returns the wrapper."""
    cache = folder if isinstance(folder, TextEmbeddingCache) else TextEmbeddingCache(folder, max_bytes, max_entries)
    backend.text_cache = CachedTextEncoder(backend, cache, encode=backend.run_text_encoder)
    return backend.text_cache


__all__ = ["CachedTextEncoder", "TextEmbeddingCache", "enable_text_cache"]
