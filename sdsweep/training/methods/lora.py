"""LoRA adapters (peft) on the UNet attention projections, optionally on the text encoder too.

The base weights stay frozen; only the low-rank adapter matrices train. The saved file is the
diffusers LoRA layout, so ``pipe.load_lora_weights(folder)`` loads it onto any copy of the base model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdsweep.config.methods import LORA_FILE
from sdsweep.training.methods.base import FineTuneMethod

WEIGHTS_NAME = LORA_FILE  # one name, in the method spec (export finds it there without torch)
# CLIP text encoder attention projections (the UNet's are named to_q/to_k/to_v/to_out.0).
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class LoRA(FineTuneMethod):
    name = "lora"

    @classmethod
    def load_trained(cls, cfg, weights_dir: Path, device, scheduler: str):
        from sdsweep.models.loading import load_pipeline, resolve_model_source

        pipe = load_pipeline(resolve_model_source(cfg.model, cfg.paths.cache), scheduler, device)
        pipe.load_lora_weights(str(weights_dir), weight_name=WEIGHTS_NAME)
        return pipe

    @classmethod
    def mark_trainable(cls, unet, text_encoder, footprint) -> None:
        from peft import LoraConfig

        with torch.device("meta"):
            unet.add_adapter(
                LoraConfig(
                    r=footprint.lora_rank,
                    lora_alpha=footprint.lora_rank,
                    target_modules=list(footprint.lora_targets),
                )
            )

    @classmethod
    def mark_text_encoder(cls, text_encoder, footprint) -> None:
        """Adapters on a text encoder are not modelled by the memory estimate: the encoder stays frozen."""

    def prepare(self) -> None:
        unet, text_encoder = self.components.unet, self.components.text_encoder
        unet.requires_grad_(False)
        for encoder in self.components.text_encoders:
            encoder.requires_grad_(False)
        # The adapters' random init (lora_A; lora_B starts at zero) comes from train.seed, not from whatever
        # the global RNG holds: a rerun, and every data-parallel rank, starts from the same adapters.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.train.seed)
            self._add_adapters(unet, text_encoder)
        if self.cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()

    def _add_adapters(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        from peft import LoraConfig

        method = self.cfg.method
        # add_adapter leaves exactly the new lora_A/lora_B weights trainable.
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
            for encoder in self.components.text_encoders:  # SDXL: both encoders, as diffusers' SDXL script
                encoder.add_adapter(
                    LoraConfig(
                        r=method.text_encoder_rank,
                        # alpha == rank keeps the text adapter's scale at 1, independent of its rank.
                        lora_alpha=method.text_encoder_rank,
                        lora_dropout=method.dropout,
                        init_lora_weights="gaussian",
                        target_modules=TEXT_ENCODER_TARGETS,
                    )
                )
                encoder.train()
            # Adapters where the conditioning never reads (SDXL's first encoder's last layer) stay frozen.
            for unread in self.components.version.unread_text_modules(self.components.text_encoders):
                unread.requires_grad_(False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        modules = [self.components.unet]
        if self.cfg.method.train_text_encoder:
            modules.extend(self.components.text_encoders)
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def save(self, out_dir: Path) -> Path:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def adapter_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
            # LoRA never resizes the vocabulary, so no embedding layers belong in the file.
            adapter = get_peft_model_state_dict(module, save_embedding_layers=False)
            return convert_state_dict_to_diffusers(adapter)

        # The version's pipeline writes its own layout: SDXL's file also holds text_encoder_2's layers.
        # Each part's LoraConfig goes into the file's metadata, so that load_lora_weights (and the kohya
        # export) scale by the trained lora_alpha; without it diffusers assumes alpha == rank.
        parts = {"unet": self.components.unet}
        if self.cfg.method.train_text_encoder:
            parts.update(
                {part: getattr(self.components, part) for part in self.components.version.text_encoder_parts}
            )
        layers = {}
        for part, module in parts.items():
            layers[f"{part}_lora_layers"] = adapter_layers(module)
            layers[f"{part}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        out_dir = Path(out_dir)
        self.components.version.pipeline_cls().save_lora_weights(
            out_dir, **layers, weight_name=WEIGHTS_NAME, safe_serialization=True
        )
        return out_dir / WEIGHTS_NAME
