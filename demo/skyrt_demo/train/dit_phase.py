"""Stage 3, the DiT and its text encoder: the models, the step loop (AdamW with warm-up and cosine
decay, EMA weights that are what gets saved), its checkpoints and the measurements the card reports.
`--dit-init` starts from an earlier run's DiT, grown deeper when asked (dit_growth.py)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from skyrt.export.dit import WanDiT
from skyrt.export.text_encoder import TextEncoder, load_tokenizer, umt5_config_for_official

from .checkpoints import load_checkpoint, save_atomic
from .data import LatentData
from .dit_batches import weighted_flow_loss
from .dit_growth import grown_dit_state
from .loop import ema_update, head_mean, log_record, lr_factor, progress_bar, tail_mean
from .sensitivity import prompt_sensitivity


class DiTTraining:
    """The Trainer's DiT stage (a mixin: uses self.cfg, self.ck, self.out, self.tokenizer_dir, self.summary
    and DiTBatches)."""

    def _new_text_model(self):
        from transformers import UMT5EncoderModel

        tokenizer = load_tokenizer(self.tokenizer_dir)
        config = umt5_config_for_official("tiny", vocab_size=len(tokenizer), d_model=self.cfg.text_dim,
                                          d_kv=self.cfg.text_dim // self.cfg.text_heads, d_ff=self.cfg.text_ffn,
                                          num_layers=self.cfg.text_layers, num_heads=self.cfg.text_heads)
        torch.manual_seed(self.cfg.seed + 3)
        return UMT5EncoderModel(config), tokenizer

    def _new_dit(self) -> WanDiT:
        torch.manual_seed(self.cfg.seed + 4)
        dit = WanDiT(self.cfg.dit_config())
        with torch.no_grad():  # adaLN-zero style: the untrained model predicts velocity 0
            dit.head.head.weight.zero_()
            dit.head.head.bias.zero_()
        return dit

    def train_dit(self, data: LatentData):
        cfg = self.cfg
        path = self.ck / "dit.pt"
        text_model, tokenizer = self._new_text_model()
        dit = self._new_dit()
        ema_dit, ema_text = self._new_dit(), self._new_text_model()[0]
        ema_dit.load_state_dict(dit.state_dict())
        ema_text.load_state_dict(text_model.state_dict())
        encoder = TextEncoder(text_model, tokenizer, text_len=cfg.text_len)
        text_model.requires_grad_(True)  # TextEncoder freezes its model; here it is trained
        opt = torch.optim.AdamW([{"params": list(dit.parameters()), "lr": cfg.dit_lr, "base": cfg.dit_lr},
                                 {"params": list(text_model.parameters()), "lr": cfg.text_lr, "base": cfg.text_lr}],
                                betas=(0.9, 0.99), weight_decay=0.01)
        rng = np.random.default_rng([cfg.seed, 3])
        gen = torch.Generator().manual_seed(cfg.seed + 12)
        step, history = 0, []
        if cfg.dit_init and not path.exists():
            init = load_checkpoint(Path(cfg.dit_init).expanduser())
            dit_state = grown_dit_state(init["ema_dit"], dit)  # the same state when the depths agree
            for module, weights in ((dit, dit_state), (ema_dit, dit_state), (text_model, init["ema_text"]),
                                    (ema_text, init["ema_text"])):
                module.load_state_dict(weights)
        if path.exists():
            state = load_checkpoint(path)
            dit.load_state_dict(state["dit"])
            text_model.load_state_dict(state["text"])
            ema_dit.load_state_dict(state["ema_dit"])
            ema_text.load_state_dict(state["ema_text"])
            opt.load_state_dict(state["opt"])
            rng.bit_generator.state = state["rng"]
            gen.set_state(state["gen"])
            step, history = state["step"], state["history"]
        token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def tokens(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            for p in prompts:
                if p not in token_cache:
                    ids, mask = encoder.tokenize([p])
                    token_cache[p] = (ids[0], mask[0])
            return (torch.stack([token_cache[p][0] for p in prompts]), torch.stack([token_cache[p][1] for p in prompts]))

        def context_of(text, prompts: list[str]) -> torch.Tensor:
            """TextEncoder.encode semantics (rows past the prompt are zero), with gradients: [B, L, C]."""
            ids, mask = tokens(prompts)
            return text(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None].float()

        probe = self._dit_batch(data, np.random.default_rng([cfg.seed, 8]), torch.Generator().manual_seed(cfg.seed + 13))

        @torch.no_grad()
        def probe_loss(dit_model, text) -> float:
            x_t, t, target, weight, prompts, block = probe
            return float(weighted_flow_loss(dit_model(x_t, t, context_of(text, prompts), causal_block_size=block),
                                            target, weight))

        resumed = path.exists() and state.get("probe_start") is not None
        probe_start = state["probe_start"] if resumed else probe_loss(dit, text_model)
        dit.train()
        text_model.train()
        bar = progress_bar(cfg.dit_steps, step, "dit", cfg.progress)
        tic = time.time()
        while step < cfg.dit_steps:
            factor = lr_factor(step, cfg.dit_steps, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = group["base"] * factor
            x_t, t, target, weight, prompts, block = self._dit_batch(data, rng, gen)
            v = dit(x_t, t, context_of(text_model, prompts), causal_block_size=block)  # [B, 16, F, h, w]
            loss = weighted_flow_loss(v, target, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(dit.parameters()) + list(text_model.parameters()), 1.0)
            opt.step()
            # EMA from the end of warm-up, with the usual ramp (n + 1) / (n + 10) so short runs average too.
            n = step - cfg.warmup
            decay = 0.0 if n < 0 else min(cfg.ema, (n + 1) / (n + 10))
            ema_update(ema_dit, dit, decay)
            ema_update(ema_text, text_model, decay)
            step += 1
            history.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % cfg.log_every == 0 or step == cfg.dit_steps:
                log_record(self.out, {"stage": "dit", "step": step, "loss": float(np.mean(history[-cfg.log_every:])),
                                "lr": cfg.dit_lr * factor, "sec_per_step": (time.time() - tic) / cfg.log_every})
                tic = time.time()
            if step % cfg.checkpoint_every == 0 or step == cfg.dit_steps:
                save_atomic({"dit": dit.state_dict(), "text": text_model.state_dict(), "ema_dit": ema_dit.state_dict(),
                              "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "rng": rng.bit_generator.state,
                              "gen": gen.get_state(), "step": step, "history": history, "probe_start": probe_start},
                             path)
        bar.close()
        dit.eval()
        self.summary["dit"] = {"steps": step, "loss_start": head_mean(history), "loss_end": tail_mean(history),
                               "probe_loss_start": probe_start, "probe_loss_end": probe_loss(dit, text_model),
                               "probe_loss_end_ema": probe_loss(ema_dit, ema_text),
                               "prompt_sensitivity": prompt_sensitivity(ema_dit, lambda p: context_of(ema_text, p), data,
                                                                        block=cfg.num_frame_per_block, seed=cfg.seed),
                               "params": sum(p.numel() for p in dit.parameters()),
                               "text_params": sum(p.numel() for p in text_model.parameters())}
        return ema_dit.eval(), ema_text.eval()
