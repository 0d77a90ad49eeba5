"""Full UNet fine-tune on image-caption pairs, optionally with an EMA copy and the text encoder."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from sdsweep.models.loading import build_pipeline
from sdsweep.training.methods.base import FineTuneMethod, save_pipeline_folder


class FullFineTune(FineTuneMethod):
    name = "full"

    @classmethod
    def load_trained(cls, cfg, weights_dir: Path, device, scheduler: str):
        from sdsweep.models.loading import load_pipeline

        return load_pipeline(str(weights_dir), scheduler, device)  # a whole pipeline folder

    ema = None  # a diffusers EMAModel once prepare() ran with method.use_ema

    def prepare(self) -> None:
        unet = self.components.unet
        unet.requires_grad_(True)
        unet.train()
        if self.cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.cfg.method.train_text_encoder:
            for encoder in self.components.text_encoders:  # SDXL: both, as diffusers' SDXL script
                encoder.requires_grad_(True)
                encoder.train()
            for unread in self.components.version.unread_text_modules(self.components.text_encoders):
                unread.requires_grad_(False)
        self.ema = None
        if self.cfg.method.use_ema:
            from diffusers.training_utils import EMAModel

            # EMA tracks the UNet only, as in the published recipes; a trained text encoder is saved live.
            self.ema = EMAModel(unet.parameters(), decay=self.cfg.method.ema_decay)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.components.unet]
        if self.cfg.method.train_text_encoder:
            modules.extend(self.components.text_encoders)
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.components.unet.parameters())

    def evaluated_unet(self) -> torch.nn.Module:
        """The UNet that is evaluated and saved: a copy holding the EMA average when EMA is on.

        A copy rather than swapping weights in place, because the returned pipeline may outlive the
        call while training continues on the live weights.
        """
        if self.ema is None:
            return self.components.unet
        unet = copy.deepcopy(self.components.unet)
        self.ema.copy_to(unet.parameters())
        return unet.eval()

    def pipeline_for_eval(self, scheduler_name: str = "dpmsolver++"):
        if self.ema is None:
            return super().pipeline_for_eval(scheduler_name)
        with_ema = dataclasses.replace(self.components, unet=self.evaluated_unet())
        return build_pipeline(with_ema, scheduler_name, self.device)

    def save(self, out_dir: Path) -> Path:
        return save_pipeline_folder(self.components, out_dir, unet=self.evaluated_unet())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        if self.ema is not None:
            state.update({f"ema.{i}": p.detach().cpu() for i, p in enumerate(self.ema.shadow_params)})
            # The EMA decay warms up with its step count, so a resumed run needs it too.
            state["ema.optimization_step"] = torch.tensor(self.ema.optimization_step)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        if self.ema is not None:
            with torch.no_grad():
                for i, shadow in enumerate(self.ema.shadow_params):
                    shadow.copy_(state[f"ema.{i}"].to(shadow.device, shadow.dtype))
            self.ema.optimization_step = int(state["ema.optimization_step"])
