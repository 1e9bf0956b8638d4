"""Stage 3, the DiT and its text encoder: the models, the step loop (AdamW with warm-up and cosine
decay, EMA weights that are what gets saved), its checkpoints and the measurements the card reports.
`--dit-init` starts from an earlier run's DiT, grown deeper when asked (dit_growth.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
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


class PromptContexts:
    """Text contexts for training: prompts tokenized once (cached), encoded with gradients."""

    def __init__(self, encoder: TextEncoder):
        self.encoder = encoder
        self.token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), each [B, L]."""
        for p in prompts:
            if p not in self.token_cache:
                ids, mask = self.encoder.tokenize([p])
                self.token_cache[p] = (ids[0], mask[0])
        return (torch.stack([self.token_cache[p][0] for p in prompts]),
                torch.stack([self.token_cache[p][1] for p in prompts]))

    def __call__(self, text, prompts: list[str]) -> torch.Tensor:
        """TextEncoder.encode semantics (rows past the prompt are zero), with gradients: [B, L, C]."""
        ids, mask = self.tokens(prompts)
        return text(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None].float()


@dataclass
class DiTRun:
    """What the DiT step loop carries from step to step: exactly what its checkpoint stores."""

    dit: WanDiT
    text_model: torch.nn.Module
    ema_dit: WanDiT
    ema_text: torch.nn.Module
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    gen: torch.Generator
    step: int = 0
    history: list[float] = field(default_factory=list)
    probe_start: float | None = None  # loss on the fixed probe batch before the first step

    def start_from(self, init: dict) -> None:
        """A fresh run from another run's checkpoint (--dit-init): its EMA weights, the DiT grown to this
        run's depth (the same state when the depths agree)."""
        dit_state = grown_dit_state(init["ema_dit"], self.dit)
        for module, weights in ((self.dit, dit_state), (self.ema_dit, dit_state), (self.text_model, init["ema_text"]),
                                (self.ema_text, init["ema_text"])):
            module.load_state_dict(weights)

    def restore(self, state: dict) -> None:
        """Continue from this run's own checkpoint."""
        self.dit.load_state_dict(state["dit"])
        self.text_model.load_state_dict(state["text"])
        self.ema_dit.load_state_dict(state["ema_dit"])
        self.ema_text.load_state_dict(state["ema_text"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])
        self.step, self.history = state["step"], state["history"]
        self.probe_start = state.get("probe_start")

    def checkpoint(self) -> dict:
        return {"dit": self.dit.state_dict(), "text": self.text_model.state_dict(), "ema_dit": self.ema_dit.state_dict(),
                "ema_text": self.ema_text.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state,
                "gen": self.gen.get_state(), "step": self.step, "history": self.history, "probe_start": self.probe_start}


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
        """Train the DiT and the text encoder (resuming from OUT/checkpoints/dit.pt when there is one);
        returns the EMA models, the ones that get saved."""
        cfg = self.cfg
        path = self.ck / "dit.pt"
        text_model, tokenizer = self._new_text_model()
        dit = self._new_dit()
        ema_dit, ema_text = self._new_dit(), self._new_text_model()[0]
        ema_dit.load_state_dict(dit.state_dict())
        ema_text.load_state_dict(text_model.state_dict())
        contexts = PromptContexts(TextEncoder(text_model, tokenizer, text_len=cfg.text_len))
        text_model.requires_grad_(True)  # TextEncoder freezes its model; here it is trained
        opt = torch.optim.AdamW([{"params": list(dit.parameters()), "lr": cfg.dit_lr, "base": cfg.dit_lr},
                                 {"params": list(text_model.parameters()), "lr": cfg.text_lr, "base": cfg.text_lr}],
                                betas=(0.9, 0.99), weight_decay=0.01)
        run = DiTRun(dit, text_model, ema_dit, ema_text, opt, rng=np.random.default_rng([cfg.seed, 3]),
                     gen=torch.Generator().manual_seed(cfg.seed + 12))
        if cfg.dit_init and not path.exists():
            run.start_from(load_checkpoint(Path(cfg.dit_init).expanduser()))
        if path.exists():
            run.restore(load_checkpoint(path))
        probe = self._dit_batch(data, np.random.default_rng([cfg.seed, 8]), torch.Generator().manual_seed(cfg.seed + 13))

        @torch.no_grad()
        def probe_loss(dit_model, text) -> float:
            x_t, t, target, weight, prompts, block = probe
            return float(weighted_flow_loss(dit_model(x_t, t, contexts(text, prompts), causal_block_size=block),
                                            target, weight))

        if run.probe_start is None:
            run.probe_start = probe_loss(dit, text_model)
        self._dit_steps(run, data, contexts, path)
        dit.eval()
        self.summary["dit"] = {"steps": run.step, "loss_start": head_mean(run.history),
                               "loss_end": tail_mean(run.history),
                               "probe_loss_start": run.probe_start, "probe_loss_end": probe_loss(dit, text_model),
                               "probe_loss_end_ema": probe_loss(ema_dit, ema_text),
                               "prompt_sensitivity": prompt_sensitivity(ema_dit, lambda p: contexts(ema_text, p), data,
                                                                        block=cfg.num_frame_per_block, seed=cfg.seed),
                               "params": sum(p.numel() for p in dit.parameters()),
                               "text_params": sum(p.numel() for p in text_model.parameters())}
        return ema_dit.eval(), ema_text.eval()

    def _dit_steps(self, run: DiTRun, data: LatentData, contexts: PromptContexts, path: Path) -> None:
        """The step loop, from run.step to cfg.dit_steps: AdamW with warm-up and cosine decay, EMA, the log
        and a checkpoint every cfg.checkpoint_every steps and at the end."""
        cfg = self.cfg
        dit, text_model, opt = run.dit, run.text_model, run.opt
        dit.train()
        text_model.train()
        bar = progress_bar(cfg.dit_steps, run.step, "dit", cfg.progress)
        tic = time.time()
        while run.step < cfg.dit_steps:
            factor = lr_factor(run.step, cfg.dit_steps, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = group["base"] * factor
            x_t, t, target, weight, prompts, block = self._dit_batch(data, run.rng, run.gen)
            v = dit(x_t, t, contexts(text_model, prompts), causal_block_size=block)  # [B, 16, F, h, w]
            loss = weighted_flow_loss(v, target, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(dit.parameters()) + list(text_model.parameters()), 1.0)
            opt.step()
            # EMA from the end of warm-up, with the usual ramp (n + 1) / (n + 10) so short runs average too.
            n = run.step - cfg.warmup
            decay = 0.0 if n < 0 else min(cfg.ema, (n + 1) / (n + 10))
            ema_update(run.ema_dit, dit, decay)
            ema_update(run.ema_text, text_model, decay)
            run.step += 1
            run.history.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if run.step % cfg.log_every == 0 or run.step == cfg.dit_steps:
                log_record(self.out, {"stage": "dit", "step": run.step,
                                      "loss": float(np.mean(run.history[-cfg.log_every:])), "lr": cfg.dit_lr * factor,
                                      "sec_per_step": (time.time() - tic) / cfg.log_every})
                tic = time.time()
            if run.step % cfg.checkpoint_every == 0 or run.step == cfg.dit_steps:
                save_atomic(run.checkpoint(), path)
        bar.close()
