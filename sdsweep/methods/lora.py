"""LoRA adapters (peft) on the UNet attention projections, optionally on the text encoder too."""

from __future__ import annotations

from pathlib import Path

import torch

from sdsweep.methods.base import FineTuneMethod

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LoRA(FineTuneMethod):
    name = "lora"

    def prepare(self) -> None:
        from peft import LoraConfig

        method = self.cfg.method
        unet, encoder = self.components.unet, self.components.text_encoder
        unet.requires_grad_(False)
        encoder.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=method.rank,
                lora_alpha=method.alpha,
                lora_dropout=method.dropout,
                init_lora_weights="gaussian",
                target_modules=list(method.target_modules),
            )
        )
        if method.train_text_encoder:
            encoder.add_adapter(
                LoraConfig(
                    r=method.text_encoder_rank,
                    lora_alpha=method.text_encoder_rank,
                    init_lora_weights="gaussian",
                    target_modules=TEXT_ENCODER_TARGETS,
                )
            )
            encoder.train()
        if self.cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.components.unet.parameters() if p.requires_grad]
        if self.cfg.method.train_text_encoder:
            params += [p for p in self.components.text_encoder.parameters() if p.requires_grad]
        return params

    def save(self, out_dir: Path) -> Path:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.components.unet))
        text_layers = None
        if self.cfg.method.train_text_encoder:
            text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.components.text_encoder))
        StableDiffusionPipeline.save_lora_weights(
            out_dir, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True
        )
        return out_dir / "pytorch_lora_weights.safetensors"
