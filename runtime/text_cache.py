"""A text-embedding cache on disk: a kiosk cycling prompts never runs the umT5 encoder twice.

Entries are keyed by (encoder hash, prompt, text_len) and stored one `.npz` per prompt in a folder.
The context [1, text_len, d_model] is zero past the prompt's length (TextEncoder semantics), so only
the rows up to the last non-zero one are stored and the zeros are restored on load: an entry is a
few KB to a few hundred KB instead of text_len * d_model * 4 bytes (8 MB for umT5-xxl).

- Writes are atomic (temp file in the same folder + os.replace): a crash never leaves a half entry.
- Optional bounds (`max_bytes`, `max_entries`) evict least recently used entries (a hit touches the
  file's mtime; eviction drops the oldest mtimes first).
- An unreadable or mismatching entry is re-encoded and rewritten, with a warning.

Use it around any backend: `enable_text_cache(backend, folder)` (or `skyrt.load(..., text_cache=folder)`)
makes `backend.encode_text` go through a `CachedTextEncoder`. Torch-free (numpy only).

Run the tests: python -m pytest tests/test_text_cache.py -q
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .backends.base import Backend, TextContext

SUFFIX = ".npz"
_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Hashing model files (also the key of the onnxruntime backend's export cache)


from .engine_manifest import file_sha256  # noqa: E402  one owner of file hashing


def tree_sha256(paths: Iterable[str | Path], memo_file: str | Path | None = None) -> str:
    """One sha256 over the files under `paths` (files or folders): relative names and contents.

    Hidden files are skipped. `memo_file` (a json file) remembers each file's hash by (path, size,
    mtime) so a 30 GB checkpoint is read once, not at every start.
    """
    memo: dict[str, str] = {}
    memo_path = Path(memo_file) if memo_file else None
    if memo_path and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    digest = hashlib.sha256()
    changed = False
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            rel = path.name if path == root else path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                continue
            stat = path.stat()
            stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
            if stamp not in memo:
                memo[stamp] = file_sha256(path)
                changed = True
            digest.update(f"{root.name}/{rel}\0{memo[stamp]}\0".encode())
    if memo_path and changed:
        _atomic_write_bytes(memo_path, json.dumps(memo).encode())
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".entry.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, rows=context[:, :used], meta=np.array(json.dumps(meta)))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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


def encoder_hash_of(backend: Backend) -> str:
    """What identifies a backend's text encoder: its own `text_encoder_hash()` when it has one (the
    onnxruntime backend hashes its graph), else the text-encoder files of the model folder."""
    own = getattr(backend, "text_encoder_hash", None)
    if callable(own):
        return own()
    from .model_folder import OFFICIAL_T5, OFFICIAL_TOKENIZER

    spec = backend.model
    if spec.layout == "official":
        parts = [spec.path / OFFICIAL_T5, spec.path / OFFICIAL_TOKENIZER]
    else:
        parts = [spec.path / "text_encoder", spec.path / "tokenizer"]
    files = tree_sha256([p for p in parts if p.exists()])
    # Different backends (and dtypes) give contexts that differ in the last bits: keep them apart.
    return hashlib.sha256(f"{backend.name}|{getattr(backend, 'dtype', '')}|{files}".encode()).hexdigest()


def _to_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (torch backend); no torch import needed here
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _from_array(backend: Backend, array: np.ndarray) -> Any:
    own = getattr(backend, "context_from_array", None)
    if callable(own):
        return own(array)
    if backend.name == "torch":
        import torch  # the torch backend already imported it

        return torch.from_numpy(array).to(backend.device, backend.dtype)
    return array


class CachedTextEncoder:
    """`encode_text` through a TextEmbeddingCache; counts hits and misses (see `cache`)."""

    def __init__(self, backend: Backend, cache: TextEmbeddingCache | str | Path, encoder_hash: str | None = None):
        self.backend = backend
        self.cache = cache if isinstance(cache, TextEmbeddingCache) else TextEmbeddingCache(cache)
        self._encode = backend.encode_text  # the backend's own (bound) method
        self._encoder_hash = encoder_hash

    @property
    def encoder_hash(self) -> str:
        if self._encoder_hash is None:
            self._encoder_hash = encoder_hash_of(self.backend)
        return self._encoder_hash

    @property
    def text_len(self) -> int:
        return self.backend.model.text_len

    def encode_text(self, prompt: str) -> TextContext:
        cached = self.cache.get(self.encoder_hash, prompt, self.text_len)
        if cached is not None:
            return TextContext(prompt=prompt, value=_from_array(self.backend, cached))
        context = self._encode(prompt)
        self.cache.put(self.encoder_hash, prompt, self.text_len, _to_array(context.value))
        return context


def enable_text_cache(backend: Backend, folder: str | Path | TextEmbeddingCache, max_bytes: int | None = None,
                      max_entries: int | None = None) -> CachedTextEncoder:
    """Route `backend.encode_text` through an on-disk cache in `folder`; returns the wrapper."""
    cache = folder if isinstance(folder, TextEmbeddingCache) else TextEmbeddingCache(folder, max_bytes, max_entries)
    wrapper = CachedTextEncoder(backend, cache)
    backend.encode_text = wrapper.encode_text  # instance attribute: the pipeline calls this one
    backend.text_cache = wrapper
    return wrapper


__all__ = ["CachedTextEncoder", "TextEmbeddingCache", "enable_text_cache", "encoder_hash_of", "file_sha256",
           "tree_sha256"]
