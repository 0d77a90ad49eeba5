"""Full UNet fine-tune on image-caption pairs, optionally with an EMA copy and the text encoder."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sdsweep.methods.base import FineTuneMethod, save_full_pipeline


class FullFineTune(FineTuneMethod):
    name = "full"
    ema = None  # an EMAModel when method.use_ema

    def prepare(self) -> None:
        unet = self.components.unet
        unet.requires_grad_(True)
        unet.train()
        if self.cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.cfg.method.train_text_encoder:
            self.components.text_encoder.requires_grad_(True)
            self.components.text_encoder.train()
        self.ema = None
        if self.cfg.method.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(unet.parameters(), decay=self.cfg.method.ema_decay)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.components.unet.parameters() if p.requires_grad]
        if self.cfg.method.train_text_encoder:
            params += [p for p in self.components.text_encoder.parameters() if p.requires_grad]
        return params

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.components.unet.parameters())

    def eval_unet(self):
        """The weights that are evaluated and saved: the EMA average when EMA is on."""
        if self.ema is None:
            return self.components.unet
        unet = copy.deepcopy(self.components.unet)
        self.ema.copy_to(unet.parameters())
        return unet

    def pipeline_for_eval(self, scheduler_name: str = "dpmsolver++"):
        from sdsweep.models import SDComponents, build_pipeline

        if self.ema is None:
            return super().pipeline_for_eval(scheduler_name)
        c = self.components
        swapped = SDComponents(self.eval_unet(), c.vae, c.text_encoder, c.tokenizer, c.noise_scheduler, c.source, c.prediction_type)
        return build_pipeline(swapped, scheduler_name, self.device)

    def save(self, out_dir: Path) -> Path:
        return save_full_pipeline(self.components, out_dir, unet=self.eval_unet())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.ema is not None:
            state.update({f"ema{i}": p.detach().cpu() for i, p in enumerate(self.ema.shadow_params)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self.ema is not None:
            with torch.no_grad():
                for i, p in enumerate(self.ema.shadow_params):
                    p.copy_(state[f"ema{i}"].to(p.device, p.dtype))
