"""A local gradio app to look at a finished study and try prompts on its trials.

    python -m sdsweep.app experiments/<study> [--port 7860] [--host 127.0.0.1] [--device auto]

Tabs: the leaderboard, the learning-rate x steps contact sheet, two trials (or a trial and the baseline)
side by side on the same prompt and seed, and a prompt box that generates from a chosen trial with the
study's sampler. Each trial's weights are loaded once (through ``sdsweep.results.generate``'s loaders) and kept.
Needs the ``app`` extra (gradio); works on CPU with the tiny model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from sdsweep.metric_names import LR_KEY, STEP_KEY

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool

BASELINE = "baseline"
LEADERBOARD_COLUMNS = ["trial", "state", "method", LR_KEY, STEP_KEY]


class StudyApp:
    """The study's data plus a cache of loaded pipelines, one per trial (weights load once)."""

    def __init__(self, study_dir: str | Path, device: str = "auto"):
        from sdsweep import io
        from sdsweep.results.export import TRIAL_FILE
        from sdsweep.results.study_folder import load_study

        self.study_dir = Path(study_dir)
        # A folder sdsweep.export wrote (any --format): its one trial and the base model, no leaderboard.
        self.exported = (
            io.read_json(self.study_dir / TRIAL_FILE) if (self.study_dir / TRIAL_FILE).is_file() else None
        )
        # StudyFolderError names the fix for a wrong folder
        self.data = None if self.exported is not None else load_study(self.study_dir)
        self.device = device
        self._pipelines: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()  # gradio serves requests on threads; load each trial once
        self.loads = 0  # how many pipelines were loaded (tests check the cache)

    def choices(self) -> list[str]:
        """``baseline`` and every trial that kept its weights."""
        from sdsweep import io

        if self.exported is not None:
            return [BASELINE, str(self.exported.get("trial"))]
        trials = [
            str(int(d.name))
            for d in self.data.paths.trial_dirs()
            if (d / io.TRIAL_WEIGHTS).exists() and (d / io.TRIAL_CONFIG).exists()
        ]
        return [BASELINE] + trials

    def leaderboard(self):
        if self.exported is not None:
            import pandas as pd

            summary = self.exported
            return pd.DataFrame(
                [
                    {
                        "trial": summary.get("trial"),
                        "method": summary.get("method"),
                        **(summary.get("metrics") or {}),
                    }
                ]
            )
        results = self.data.results
        metrics = [c for c in results.columns if c.startswith(("eval/", "human/"))]
        shown = [c for c in LEADERBOARD_COLUMNS if c in results.columns] + metrics
        return results[shown].round(4) if not results.empty else results

    def contact_sheet(self) -> str | None:
        from sdsweep.results.figures import contact_sheet

        if self.data is None:
            return None
        out = Path(tempfile.mkdtemp(prefix="sdsweep-app-")) / "contact_sheet.png"
        made = contact_sheet(self.data, out)
        return str(made) if isinstance(made, Path) else None

    def pipeline(self, which: str):
        """(pipeline, cfg) for ``baseline`` or a trial number, loaded on first use and kept."""
        from sdsweep.models.loading import select_device
        from sdsweep.results.generate import load_pipeline_for, resolve_target

        with self._lock:
            if which not in self._pipelines:
                target = resolve_target(self.study_dir, which)
                self._pipelines[which] = load_pipeline_for(target, select_device(self.device), None)
                self.loads += 1
            return self._pipelines[which]

    def generate(self, which: str, prompt: str, seed: float, steps: float | None = None):
        """One image from ``which`` with the study's sampler, guidance and resolution."""
        import torch

        from sdsweep.config.resolve import resolved_resolution

        if not str(prompt).strip():
            raise ValueError("Enter a prompt.")
        pipeline, cfg = self.pipeline(str(which))
        resolution = cfg.eval.resolution or resolved_resolution(cfg)
        with self._lock:  # one pipeline call at a time: the cached modules are shared
            return pipeline(
                str(prompt),
                num_inference_steps=int(steps or cfg.eval.num_inference_steps),
                guidance_scale=cfg.eval.guidance_scale,
                height=resolution,
                width=resolution,
                generator=torch.Generator("cpu").manual_seed(int(seed)),  # same image on any device
            ).images[0]

    def compare(self, left: str, right: str, prompt: str, seed: float):
        return self.generate(left, prompt, seed), self.generate(right, prompt, seed)


def build_ui(app: StudyApp):
    import gradio as gr

    choices = app.choices()
    first_trial = choices[1] if len(choices) > 1 else BASELINE
    default_prompt = "a photo of sks"
    with gr.Blocks(title=f"sdsweep: {app.study_dir.name}") as demo:
        gr.Markdown(f"# {app.study_dir.name}")
        with gr.Tab("Leaderboard"):
            gr.Dataframe(app.leaderboard(), interactive=False)
        with gr.Tab("Contact sheet"):
            sheet = app.contact_sheet()
            if sheet:
                gr.Image(sheet, label="learning rate x steps", interactive=False)
            else:
                gr.Markdown("_No learning-rate x steps grid in this study._")
        with gr.Tab("Compare"):
            with gr.Row():
                left = gr.Dropdown(choices, value=BASELINE, label="left")
                right = gr.Dropdown(choices, value=first_trial, label="right")
            with gr.Row():
                compare_prompt = gr.Textbox(default_prompt, label="prompt")
                compare_seed = gr.Number(0, precision=0, label="seed")
            compare_button = gr.Button("Compare")
            with gr.Row():
                left_image, right_image = gr.Image(label="left"), gr.Image(label="right")
            compare_button.click(
                app.compare,
                [left, right, compare_prompt, compare_seed],
                [left_image, right_image],
                api_name="compare",
            )
        with gr.Tab("Generate"):
            which = gr.Dropdown(choices, value=first_trial, label="trial")
            prompt = gr.Textbox(default_prompt, label="prompt")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="seed")
                steps = gr.Number(None, precision=0, label="steps (empty: the study's)")
            button = gr.Button("Generate", elem_id="generate")
            image = gr.Image(label="image", elem_id="generated")
            button.click(app.generate, [which, prompt, seed, steps], image, api_name="generate")
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdsweep.app", description=__doc__.split("\n")[0])
    parser.add_argument("study", type=Path, help="the study folder, e.g. experiments/lr_steps")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("sdsweep.results.app needs gradio: pip install 'sdsweep[app]'", file=sys.stderr)
        return 2
    build_ui(StudyApp(args.study, args.device)).launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
