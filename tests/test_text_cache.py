"""The on-disk text-embedding cache (skyrt.runtime.text_cache) around a real tiny umT5 encoder.

Run: python -m pytest tests/test_text_cache.py -q
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import skyrt
from skyrt.runtime.artifact_cache import tree_sha256
from skyrt.runtime.text_cache import CachedTextEncoder, TextEmbeddingCache


@pytest.fixture(scope="module")
def backend(official_dir):
    """The torch backend of the shared tiny model (its encode_text is the real umT5 encoder)."""
    return skyrt.load(official_dir).backend


class Counting:
    """Counts calls of the wrapped backend's own encode_text."""

    def __init__(self, backend):
        self.backend, self.calls = backend, 0
        self.model, self.name = backend.model, backend.name
        self.device, self.dtype = backend.device, backend.dtype

    def encode_text(self, prompt):
        self.calls += 1
        return self.backend.encode_text(prompt)

    def __getattr__(self, name):  # the rest of the Backend interface (context_to_array, ...) is the backend's
        return getattr(self.backend, name)


def test_hits_and_misses_with_a_real_encoder(backend, tmp_path):
    counting = Counting(backend)
    cached = CachedTextEncoder(counting, tmp_path, encoder_hash="enc-a")
    first = cached.encode_text("a red fox runs")
    again = cached.encode_text("a red fox runs")
    other = cached.encode_text("a blue bird flies")
    assert (cached.cache.hits, cached.cache.misses, counting.calls) == (1, 2, 2)
    assert again.value.dtype == first.value.dtype and again.value.device == first.value.device
    np.testing.assert_array_equal(again.value.numpy(), first.value.numpy())  # bit-exact round trip
    assert not np.array_equal(other.value.numpy(), first.value.numpy())
    # Only the rows up to the prompt's length are stored (the rest of the 512 rows are zeros).
    entry = cached.cache.path("enc-a", "a red fox runs", backend.model.text_len)
    assert entry.stat().st_size < first.value.numpy().nbytes / 4
    # A fresh wrapper over the same folder (a restarted kiosk) never runs the encoder.
    restarted = CachedTextEncoder(counting, tmp_path, encoder_hash="enc-a")
    restarted.encode_text("a red fox runs")
    assert counting.calls == 2 and restarted.cache.hits == 1
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_another_encoder_hash_misses(backend, tmp_path):
    counting = Counting(backend)
    CachedTextEncoder(counting, tmp_path, encoder_hash="enc-a").encode_text("a fox")
    other = CachedTextEncoder(counting, tmp_path, encoder_hash="enc-b")
    other.encode_text("a fox")
    assert other.cache.misses == 1 and counting.calls == 2


def test_default_encoder_hash_follows_the_encoder_files(backend, tmp_path):
    cached = CachedTextEncoder(backend, tmp_path)
    assert len(cached.encoder_hash) == 64
    assert cached.encoder_hash == CachedTextEncoder(backend, tmp_path).encoder_hash
    # the hash covers the text-encoder checkpoint: a different file gives a different tree hash
    (tmp_path / "a.bin").write_bytes(b"1")
    first = tree_sha256([tmp_path / "a.bin"])
    (tmp_path / "a.bin").write_bytes(b"2")
    assert tree_sha256([tmp_path / "a.bin"]) != first


def test_corrupted_entry_is_recomputed_with_a_warning(backend, tmp_path):
    counting = Counting(backend)
    cached = CachedTextEncoder(counting, tmp_path, encoder_hash="enc")
    good = cached.encode_text("a dancer in the rain").value.numpy()
    path = cached.cache.path("enc", "a dancer in the rain", backend.model.text_len)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated by a crash or a full disk
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = cached.encode_text("a dancer in the rain").value.numpy()
    np.testing.assert_array_equal(again, good)
    assert counting.calls == 2 and cached.cache.corrupt == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: the next read is a clean hit
        cached.encode_text("a dancer in the rain")
    assert cached.cache.hits == 1


def test_lru_eviction_keeps_the_recent_entries(tmp_path):
    cache = TextEmbeddingCache(tmp_path, max_entries=2)
    ctx = np.zeros((1, 8, 4), np.float32)
    for i, prompt in enumerate(["a", "b"]):
        ctx[0, 0, 0] = i + 1
        cache.put("enc", prompt, 8, ctx)
    cache.get("enc", "a", 8)  # "a" is now the most recently used
    paths = {p: cache.path("enc", p, 8) for p in "abc"}
    os.utime(paths["b"], ns=(1, 1))  # make the order unambiguous on coarse-mtime filesystems
    cache.put("enc", "c", 8, ctx)
    assert paths["a"].is_file() and paths["c"].is_file() and not paths["b"].exists()
    bounded = TextEmbeddingCache(tmp_path / "bytes", max_bytes=1)
    bounded.put("enc", "x", 8, ctx)
    assert bounded.entries() == []  # nothing fits in one byte


def test_load_keyword(official_dir, tmp_path):
    pipe = skyrt.load(official_dir, text_cache=tmp_path)
    pipe.backend.encode_text("x")
    pipe.backend.encode_text("x")
    assert pipe.backend.text_cache.cache.hits == 1
