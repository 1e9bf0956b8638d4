"""mode="kvcache" BEYOND the cache's capacity against an independent plain-torch oracle.

tests/test_kvcache.py checks the rollout while every block fits in the cache (it then equals the
block-causal window mode). Once blocks are evicted, or the cache is rebased near the end of the
RoPE table, there is no window-mode equivalent; this file checks the rollout against a reference
written here from WanDiT's pieces, which shares no code with CachedStep / KVRing / kv_rope_rebase:

- every committed block keeps its UN-ROTATED keys and its values (per layer) in a plain list,
  computed once, at commit (a clean pass at t = 0 against what was visible then);
- what is visible is recomputed from the list: the first `sink` committed blocks plus the last
  `window` committed ones;
- at every use, the visible keys are rotated fresh at their block's absolute frame positions
  (block * b + i), minus one common offset per step so the positions stay inside the model's
  1024-entry table (RoPE is relative, so any common offset gives the same attention);
- active blocks attend to [visible cached tokens ; active tokens block-causally].

The schedule rows come from skyrt._core.DFSchedule (tested in test_core_schedule.py); which blocks
finish (and so commit, in block order, after the row's update) is derived here from update counts.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skyrt import _core
from skyrt.export.dit import apply_rope, rope_cos_sin
from skyrt.runtime import kvcache
from window_numpy_reference import FlowUniPCScheduler

H = W = 32  # pixels -> 4x4 latents -> 2x2 tokens per frame
STEPS, SHIFT = 4, 8.0


# ---------------------------------------------------------------------------------------- oracle
def _attend(q, k, v, mask):
    """Plain softmax attention: q [Lq, N, Dh], k/v [Lk, N, Dh], bool mask [Lq, Lk] -> [Lq, N*Dh]."""
    scores = torch.einsum("qnd,knd->nqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("nqk,knd->qnd", scores.softmax(dim=-1), v).flatten(1)


class Oracle:
    """One prompt context's committed blocks and the DiT step of active frames against them."""

    def __init__(self, dit, context, block, sink, window, fps_class):
        self.dit, self.block, self.sink, self.window = dit, block, sink, window
        self.cross_kv = dit.cross_attention_kv(context)
        self.fps = None if fps_class is None else torch.tensor([fps_class])
        self.committed: list[tuple[int, list, list]] = []  # (block id, K per layer un-rotated, V per layer)
        self.clean: dict[int, np.ndarray] = {}  # block id -> clean latents, for a recache

    def visible(self):
        rest = self.committed[self.sink:]
        return self.committed[: self.sink] + (rest[-self.window:] if self.window else [])

    def run(self, x, t, first_frame):
        """x [16, f, h, w] numpy at absolute frames first_frame.. ; t [f] -> (velocity [16, f, h, w], K, V)."""
        dit, cfg = self.dit, self.dit.config
        ph, pw = cfg.patch_size[1:]
        f, hh, ww = x.shape[1], x.shape[2] // ph, x.shape[3] // pw
        hw, heads = hh * ww, cfg.num_heads
        visible = self.visible()
        pos_active = list(range(first_frame, first_frame + f))
        pos_cached = [blk * self.block + i for blk, _, _ in visible for i in range(self.block)]
        offset = min(pos_active + pos_cached)  # one common shift: stays inside the RoPE table
        cos_a, sin_a = rope_cos_sin(cfg.head_dim, [p - offset for p in pos_active], hh, ww, cfg.rope_max_positions)
        cos_c, sin_c = rope_cos_sin(cfg.head_dim, [p - offset for p in pos_cached], hh, ww, cfg.rope_max_positions)
        n_cached = len(pos_cached) * hw
        frame_block = torch.arange(f) // self.block
        causal = (frame_block[None, :] <= frame_block[:, None]).repeat_interleave(hw, 0).repeat_interleave(hw, 1)
        mask = torch.cat([torch.ones(f * hw, n_cached, dtype=torch.bool), causal], dim=1)

        tokens = dit.patchify(torch.from_numpy(np.ascontiguousarray(x))[None])  # [1, f, hw, D]
        e, e0 = dit.embed_time(torch.from_numpy(np.asarray(t, np.float32))[None], self.fps)
        ks, vs = [], []
        for layer, (blk, kv) in enumerate(zip(dit.blocks, self.cross_kv)):
            shift1, scale1, gate1, shift2, scale2, gate2 = (blk.modulation.float() + e0).unbind(dim=2)
            hid = (blk.norm1(tokens) * (1 + scale1[:, :, None]) + shift1[:, :, None]).flatten(1, 2)[0]
            sa = blk.self_attn
            q = sa.norm_q(sa.q(hid)).unflatten(-1, (heads, -1))
            k = sa.norm_k(sa.k(hid)).unflatten(-1, (heads, -1))  # un-rotated: what the list keeps
            v = sa.v(hid).unflatten(-1, (heads, -1))
            ks.append(k)
            vs.append(v)
            q_rot = apply_rope(q[None], cos_a, sin_a)[0]
            k_rot = apply_rope(k[None], cos_a, sin_a)[0]
            if visible:
                ck = torch.cat([K[layer] for _, K, _ in visible])
                cv = torch.cat([V[layer] for _, _, V in visible])
                ck_rot = apply_rope(ck[None], cos_c, sin_c)[0]  # rotated fresh at their current positions
                k_all, v_all = torch.cat([ck_rot, k_rot]), torch.cat([cv, v])
            else:
                k_all, v_all = k_rot, v
            out = _attend(q_rot, k_all, v_all, mask)
            tokens = tokens + sa.o(out).view_as(tokens) * gate1[:, :, None]
            tokens = tokens + blk.cross_attn(blk.norm3(tokens).flatten(1, 2), kv).view_as(tokens)
            hid = blk.norm2(tokens) * (1 + scale2[:, :, None]) + shift2[:, :, None]
            tokens = tokens + blk.ffn(hid) * gate2[:, :, None]
        velocity = dit.unpatchify(dit.head(tokens, e), (f, hh, ww))[0]
        return velocity.numpy(), ks, vs

    def commit(self, blk, clean):
        _, ks, vs = self.run(clean, np.zeros(self.block, np.float32), blk * self.block)
        self.committed.append((blk, ks, vs))
        self.clean[blk] = clean

    def switch(self, context, recache):
        """New prompt; with recache, the visible blocks are committed again in order, each against the
        ones redone before it (blocks no longer visible are forgotten: they will never be seen again)."""
        self.cross_kv = self.dit.cross_attention_kv(context)
        if recache:
            blocks = [blk for blk, _, _ in self.visible()]
            self.committed = []
            for blk in blocks:
                self.commit(blk, self.clean[blk])


@torch.inference_mode()
def reference(pipe, prompt, noise, *, block, ar_step, sink, window, guidance_scale, num_blocks, in_flight,
              horizon, fps=24, negative_prompt="", switch=None):
    """The first `num_blocks` clean blocks [16, num_blocks * block, h, w] of the oracle rollout.

    switch = (after_blocks, prompt, negative_prompt, recache): the prompt changes once `after_blocks`
    blocks are done, before the next schedule row."""
    dit = pipe.backend.dit
    contexts = [pipe.backend.encode_text(prompt).value]
    if guidance_scale > 1.0:
        contexts.append(pipe.backend.encode_text(negative_prompt).value)
    fps_class = (0 if fps == 16 else 1) if dit.config.inject_sample_info else None
    oracles = [Oracle(dit, c, block, sink, window, fps_class) for c in contexts]

    def sampler():
        s = FlowUniPCScheduler()
        s.set_timesteps(STEPS, shift=SHIFT)
        return s

    template = sampler().timesteps
    schedule = _core.DFSchedule(template, ar_step=ar_step, causal_block_size=block, num_prefix_blocks=0,
                                max_blocks_in_flight=in_flight, horizon_blocks=horizon)
    latents, samplers, updates, done = {}, {}, {}, []
    while len(done) < num_blocks:
        row = schedule.next()
        assert row is not None, "schedule ended early"
        index = {row.first + i: int(x) for i, x in enumerate(row.index)}
        tsteps = {row.first + i: int(x) for i, x in enumerate(row.timestep)}
        update = {row.first + i for i, u in enumerate(row.update) if u}
        active = sorted(b for b, ix in index.items() if 1 <= ix <= STEPS)
        for b in active:
            if b not in latents:
                latents[b] = noise[:, b * block:(b + 1) * block].copy()
                samplers[b] = [sampler() for _ in range(block)]
                updates[b] = 0
        if active:
            assert active == list(range(active[0], active[-1] + 1))
            x = np.concatenate([latents[b] for b in active], axis=1)
            t = np.repeat(np.array([tsteps[b] for b in active], np.float32), block)
            outs = [o.run(x, t, active[0] * block)[0] for o in oracles]
            v = outs[0] if len(outs) == 1 else outs[1] + guidance_scale * (outs[0] - outs[1])
            for i, b in enumerate(active):
                if b in update:
                    for f in range(block):
                        latents[b][:, f] = samplers[b][f].step(v[:, i * block + f], tsteps[b], latents[b][:, f])
                    updates[b] += 1
        for b in sorted(b for b in active if updates[b] == STEPS):  # finished: commit in block order
            clean = latents.pop(b)
            del samplers[b], updates[b]
            for o in oracles:
                o.commit(b, clean)
            done.append(clean)
            if switch is not None and len(done) == switch[0]:
                new_contexts = [pipe.backend.encode_text(switch[1]).value, pipe.backend.encode_text(switch[2]).value]
                for o, context in zip(oracles, new_contexts):
                    o.switch(context, recache=switch[3])
    return np.concatenate(done[:num_blocks], axis=1)


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", [
    dict(num_frames=33, block=1, ar_step=1),  # 9 blocks, up to 4 in flight together
    dict(num_frames=33, block=1, ar_step=4),  # block after block
    dict(num_frames=61, block=2, ar_step=1),  # 8 blocks of 2
    dict(num_frames=61, block=2, ar_step=4),
    dict(num_frames=33, block=1, ar_step=2, guidance_scale=5.0),  # CFG: two caches
])
def test_generate_evicting_matches_oracle(official_pipeline, case):
    case = dict(case)
    block, ar_step, gs = case.pop("block"), case.pop("ar_step"), case.pop("guidance_scale", 1.0)
    frames = (case["num_frames"] - 1) // 4 + 1
    noise = np.random.default_rng(3).standard_normal((16, frames, H // 8, W // 8), dtype=np.float32)
    got = official_pipeline.generate("a red circle", height=H, width=W, num_inference_steps=STEPS, shift=SHIFT,
                                     guidance_scale=gs, ar_step=ar_step, causal_block_size=block,
                                     base_num_frames=case["num_frames"], mode="kvcache", output="latent",
                                     causal_attention=True, sink_blocks=1, window_blocks=2, latents=noise,
                                     progress=False, **case)
    n = frames // block
    want = reference(official_pipeline, "a red circle", noise, block=block, ar_step=ar_step, sink=1, window=2,
                     guidance_scale=gs, num_blocks=n, in_flight=n, horizon=n)
    diff = np.abs(got - want).max()
    print(f"max |kvcache - oracle| = {diff:.3g} for block={block} ar_step={ar_step} cfg={gs}")
    assert got.shape == want.shape
    assert diff <= 1e-4


@pytest.mark.parametrize("block,ar_step,sink,window", [
    (1, 4, 1, 2),  # one block at a time
    (1, 1, 1, 2),  # 4 blocks in flight
    (2, 2, 1, 2),  # blocks of 2, 2 in flight
    (1, 2, 2, 1),  # two sinks, a window of one
    (1, 2, 0, 3),  # no sink
])
def test_endless_rollout_with_rebase_matches_oracle(official_pipeline, monkeypatch, block, ar_step, sink, window):
    # A tiny table so the endless rollout rebases its cache several times; the oracle stays absolute.
    monkeypatch.setattr(kvcache, "ROPE_TABLE", 12)
    shifts = []
    real = kvcache.KVCache.rebase
    monkeypatch.setattr(kvcache.KVCache, "rebase", lambda self, s: (shifts.append(s), real(self, s)))
    pipe = official_pipeline
    req = pipe._request(dict(prompt="x", num_frames=1 + 4 * 2**40, height=H, width=W, num_inference_steps=STEPS,
                             shift=SHIFT, guidance_scale=1.0, ar_step=ar_step, causal_block_size=block,
                             mode="kvcache", causal_attention=True, sink_blocks=sink, window_blocks=window))
    cond = pipe._condition(req, None, None, None)
    n = 20 // block  # 20 frames: past the 12-position table, so the cache is rebased
    # Noise for a few blocks past n too: blocks in flight when block n-1 finishes have started by then.
    noise = np.random.default_rng(4).standard_normal((16, (n + 8) * block, H // 8, W // 8), dtype=np.float32)
    rollout = kvcache.KVRollout(pipe.backend, req, cond.cond, cond.uncond, cond.rng,
                                kvcache.KVSettings(sink, window), None, noise=noise)
    got = []
    for blk in rollout.blocks():
        got.append(blk)
        if len(got) == n:
            break
    got = np.concatenate(got, axis=1)
    in_flight = max(1, math.ceil(STEPS / ar_step))
    want = reference(pipe, "x", noise, block=block, ar_step=ar_step, sink=sink, window=window, guidance_scale=1.0,
                     num_blocks=n, in_flight=in_flight, horizon=-1)
    diff = np.abs(got - want).max()
    print(f"max |kvcache - oracle| = {diff:.3g} with rebases {shifts} "
          f"(block={block}, ar_step={ar_step}, sink={sink}, window={window})")
    assert shifts, "the rollout never rebased: the test does not cover the rebase"
    assert diff <= 1e-4


# Long prompts: Wan pads the context to 512 tokens with zeros and cross-attention has no mask, so a
# short prompt is a few tokens among ~500 identical padding ones and barely moves a random model.
RED, BLUE = "a red circle " * 120, "a blue square " * 120


@pytest.mark.parametrize("recache,guidance_scale", [(False, 1.0), (True, 1.0), (True, 5.0)])
def test_prompt_switch_mid_stream_matches_oracle(official_pipeline, recache, guidance_scale):
    # Switch after 5 blocks of an evicting ring (sink 1 + window 2): without recache the cached blocks
    # keep their old-prompt K/V; with it they are committed again under the new prompt.
    pipe, block, ar_step, sink, window = prompt_sensitive(official_pipeline), 1, 2, 1, 2
    req = pipe._request(dict(prompt=RED, negative_prompt="blurry", num_frames=1 + 4 * 2**40, height=H,
                             width=W, num_inference_steps=STEPS, shift=SHIFT, guidance_scale=guidance_scale,
                             ar_step=ar_step, causal_block_size=block, mode="kvcache", causal_attention=True,
                             sink_blocks=sink, window_blocks=window))
    cond = pipe._condition(req, None, None, None)
    n, after = 10, 5
    noise = np.random.default_rng(6).standard_normal((16, n + 8, H // 8, W // 8), dtype=np.float32)
    rollout = kvcache.KVRollout(pipe.backend, req, cond.cond, cond.uncond, cond.rng, kvcache.KVSettings(sink, window),
                                None, noise=noise)
    got = []
    for blk in rollout.blocks():
        got.append(blk)
        if len(got) == after:
            uncond = pipe.backend.encode_text("grainy") if guidance_scale > 1 else None
            rollout.set_prompt(pipe.backend.encode_text(BLUE), uncond, recache=recache)
        if len(got) == n:
            break
    got = np.concatenate(got, axis=1)
    want = reference(pipe, RED, noise, block=block, ar_step=ar_step, sink=sink, window=window,
                     guidance_scale=guidance_scale, num_blocks=n, in_flight=math.ceil(STEPS / ar_step), horizon=-1,
                     negative_prompt="blurry", switch=(after, BLUE, "grainy", recache))
    unswitched = reference(pipe, RED, noise, block=block, ar_step=ar_step, sink=sink, window=window,
                           guidance_scale=guidance_scale, num_blocks=n, in_flight=math.ceil(STEPS / ar_step),
                           horizon=-1, negative_prompt="blurry")
    other = reference(pipe, RED, noise, block=block, ar_step=ar_step, sink=sink, window=window,
                      guidance_scale=guidance_scale, num_blocks=n, in_flight=math.ceil(STEPS / ar_step), horizon=-1,
                      negative_prompt="blurry", switch=(after, BLUE, "grainy", not recache))
    diff = np.abs(got - want).max()
    print(f"max |kvcache - oracle| = {diff:.3g} after a prompt switch (recache={recache}, cfg={guidance_scale}); "
          f"the switch moves blocks by {np.abs(want - unswitched).max():.3g}, recache by {np.abs(want - other).max():.3g}")
    assert np.abs(got[:, :after] - want[:, :after]).max() <= 1e-4
    # The switch (0.05-0.2 here) and the recache (6e-4-3e-3) move the blocks well past the 1e-4
    # tolerance, so a rollout that ignored either would fail.
    assert np.abs(want - unswitched).max() > 1e-2 and np.abs(want - other).max() > 4e-4
    assert diff <= 1e-4


def prompt_sensitive(pipe):
    """A copy of the tiny pipeline whose DiT listens harder to the prompt (cross-attention output x10),
    so that a prompt switch and a recache move the blocks well above the comparison tolerance."""
    import copy

    pipe = copy.deepcopy(pipe)
    with torch.no_grad():
        for block in pipe.backend.dit.blocks:
            block.cross_attn.o.weight.mul_(10.0)
    return pipe
