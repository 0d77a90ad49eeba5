"""A fifth method from outside the package: BitFit, written here and plugged in the way a user would.

BitFit (Ben Zaken et al. 2022) trains only bias terms; here the UNet's. The plugin is three files the test
writes (its schema and spec, its trainer, its ``method=bitfit`` YAML); ``SDSWEEP_PLUGINS`` names it, and
``python -m sdsweep`` sweeps it, then the memory estimate, ``sdsweep.export`` and ``sdsweep.report`` handle
it, with nothing under ``sdsweep/`` knowing its name. A grep-like test keeps method names from being
compared as strings outside the methods' own modules.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, TINY_OVERRIDES

PACKAGE = REPO / "sdsweep"
# Where a method may say its own name: its trainer module and the schema module with its spec.
METHOD_MODULES = (PACKAGE / "training" / "methods", PACKAGE / "config" / "methods.py")

PLUGIN_INIT = '''
"""BitFit as an sdsweep method plugin: its options, its description, and its method=bitfit entry."""

from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sdsweep.config.methods import PIPELINE_FILE, PIPELINE_FORMAT, MethodOptions, MethodSpec, register_method


@dataclass
class BitFitOptions(MethodOptions):
    train_norms: bool = False  # also train the normalisation layers' scales (BitFit + LayerNorm)


register_method(
    MethodSpec(
        name="bitfit",
        schema=BitFitOptions,
        trainer="sdsweep_bitfit.train:BitFit",  # imported only where a run trains or loads weights
        weights_format=PIPELINE_FORMAT,  # saves a whole pipeline folder, like a full fine-tune
        weights_file=PIPELINE_FILE,
        card_options=("train_norms",),
    )
)
# The config group entry, from the YAML beside this file: `method=bitfit` on the command line.
ConfigStore.instance().store(group="method", name="bitfit", node=OmegaConf.load(Path(__file__).with_name("bitfit.yaml")))
'''

PLUGIN_TRAIN = '''
"""BitFit's trainer: only the UNet's bias terms (and, with method.train_norms, its norm scales) train."""

from pathlib import Path

from sdsweep.training.methods.base import FineTuneMethod, save_pipeline_folder


def trained(unet, train_norms):
    return [
        p for name, p in unet.named_parameters()
        if name.endswith(".bias") or (train_norms and "norm" in name)
    ]


class BitFit(FineTuneMethod):
    name = "bitfit"

    @classmethod
    def load_trained(cls, cfg, weights_dir: Path, device, scheduler: str):
        from sdsweep.models.loading import load_pipeline

        return load_pipeline(str(weights_dir), scheduler, device)

    @classmethod
    def mark_trainable(cls, unet, text_encoder, footprint):
        for parameter in trained(unet, train_norms=False):
            parameter.requires_grad_(True)

    def prepare(self):
        unet = self.components.unet
        unet.requires_grad_(False)
        self.components.text_encoder.requires_grad_(False)
        for parameter in trained(unet, self.cfg.method.train_norms):
            parameter.requires_grad_(True)
        unet.train()

    def trainable_parameters(self):
        return [p for p in self.components.unet.parameters() if p.requires_grad]

    def save(self, out_dir: Path) -> Path:
        return save_pipeline_folder(self.components, out_dir)
'''

PLUGIN_YAML = """\
# BitFit: train only the UNet's bias terms (Ben Zaken et al. 2022), about 0.1% of its parameters.
name: bitfit
learning_rate: 1.0e-3
train_norms: false
"""


def write_plugin(root: Path) -> Path:
    """The plugin package under ``root``; returns the folder to put on PYTHONPATH."""
    package = root / "sdsweep_bitfit"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(PLUGIN_INIT).lstrip())
    (package / "train.py").write_text(textwrap.dedent(PLUGIN_TRAIN).lstrip())
    (package / "bitfit.yaml").write_text(PLUGIN_YAML)
    return root


def plugin_env(path: Path, plugins: str | None = "sdsweep_bitfit") -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(path), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("SDSWEEP_PLUGINS", None)
    if plugins:
        env["SDSWEEP_PLUGINS"] = plugins
    return env


def run(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


MEMORY_SCRIPT = """
import json, sys, torch
from sdsweep.config.compose import compose_typed
from sdsweep.training.memory import estimate_for_config
overrides = json.loads(sys.argv[1])
out = {}
for method in ("bitfit", "full"):
    estimate = estimate_for_config(compose_typed(overrides + [f"method={method}"]), torch.device("cpu"))
    out[method] = {"trainable": estimate.trainable_parameters, "text": estimate.describe()}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_fifth_method_from_the_tests_folder_sweeps_estimates_exports_and_reports(tmp_path, tiny_model_dirs):
    from diffusers import UNet2DConditionModel

    env = plugin_env(write_plugin(tmp_path / "plugins"))
    root = tmp_path / "experiments"
    overrides = [
        *TINY_OVERRIDES,
        "method=bitfit",
        "method.train_norms=false",  # the plugin's own option, typed by its schema
        "eval.metrics=[clip_score,appropriate_rate,val_loss]",
    ]
    # The sweep, through the command a user types.
    sweep = run(
        [
            "-m",
            "sdsweep",
            *overrides,
            "+sweep=lr_steps",
            "sweep.learning_rates=[1e-3,1e-1]",
            "sweep.steps=[2]",
            "sweep.keep_best_k=-1",
            f"paths.root={root}",
            "study=bitfit",
        ],
        env,
    )
    assert "predicted peak memory" in sweep.stdout + sweep.stderr  # preflight's estimate, before training
    study = root / "bitfit"
    results = pd.read_csv(study / "results.csv")
    assert len(results) == 2 and (results["state"] == "COMPLETE").all(), results.to_string()
    assert (results["method"] == "bitfit").all()

    # Only biases trained: every other UNet tensor equals the base model's.
    base = UNet2DConditionModel.from_pretrained(tiny_model_dirs["sd15"], subfolder="unet")
    trained_dir = study / results.sort_values("method.learning_rate")["trial_dir"].iloc[-1] / "weights"
    tuned = UNet2DConditionModel.from_pretrained(trained_dir, subfolder="unet")
    before, after = base.state_dict(), tuned.state_dict()
    changed = {name for name in before if not before[name].equal(after[name])}
    assert changed and all(name.endswith(".bias") for name in changed), sorted(changed)[:5]

    # The memory estimate marks what the plugin's mark_trainable marks: the UNet's biases.
    memory = json.loads(
        run(["-c", MEMORY_SCRIPT, json.dumps(list(TINY_OVERRIDES))], env).stdout.splitlines()[-1]
    )
    biases = sum(p.numel() for name, p in base.named_parameters() if name.endswith(".bias"))
    assert memory["bitfit"]["trainable"] == biases < memory["full"]["trainable"]

    # Export: a pipeline folder with a model card listing the plugin's option, as a user runs it.
    out = tmp_path / "model"
    run(["-m", "sdsweep.export", str(study), "--to", str(out)], env)
    summary = json.loads((out / "sdsweep_trial.json").read_text())
    assert summary["method"] == "bitfit" and summary["weights_format"] == "pipeline"
    card = (out / "README.md").read_text()
    assert "**bitfit**" in card and "method.train_norms" in card
    assert (out / "model_index.json").is_file()

    # The report, as a user runs it.
    run(["-m", "sdsweep.report", str(study)], env)
    assert "bitfit" in (study / "report.md").read_text()


def test_entry_points_and_the_environment_load_plugins_and_unknown_ones_are_named(tmp_path):
    """An installed package registers through the ``sdsweep.methods`` entry point; a missing module is one
    ConfigError naming the variable."""
    path = write_plugin(tmp_path / "plugins")
    info = path / "sdsweep_bitfit-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sdsweep-bitfit\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sdsweep.methods]\nbitfit = sdsweep_bitfit\n")
    script = "from sdsweep.config.methods import method_names; print(','.join(method_names()))"
    listed = run(["-c", script], plugin_env(path, plugins=None)).stdout.strip()
    assert listed == "full,dreambooth,textual_inversion,lora,bitfit"
    missing = subprocess.run(
        [sys.executable, "-c", script],
        env=plugin_env(tmp_path, plugins="no_such_plugin"),
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "SDSWEEP_PLUGINS='no_such_plugin'" in missing.stderr


def test_the_package_never_names_the_plugin():
    assert not [p for p in PACKAGE.rglob("*.py") if "bitfit" in p.read_text().lower()]


# ---- no method name compared as a string outside the methods' own modules ----------------------------
def builtin_method_names() -> set[str]:
    from sdsweep.config.methods import METHOD_SPECS

    return set(list(METHOD_SPECS)[:4])  # the built-in methods (registered first)


def name_literals(node: ast.AST, names: set[str]) -> list[str]:
    """Method names written as string literals in ``node`` (itself, or inside a tuple/list/set)."""
    if isinstance(node, ast.Constant) and node.value in names:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for element in node.elts for n in name_literals(element, names)]
    return []


def method_name_uses(path: Path, names: set[str]) -> list[str]:
    """``x == "lora"``, ``x in ("full", "dreambooth")``, ``{"lora": ...}`` dispatch tables and name sets."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        literals: list[str] = []
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                literals += name_literals(operand, names)
        elif isinstance(node, ast.Dict):
            literals += [n for key in node.keys if key is not None for n in name_literals(key, names)]
        elif isinstance(node, ast.Set):
            literals += name_literals(node, names)
        where = path.relative_to(REPO) if REPO in path.parents else path.name
        found += [f"{where}:{node.lineno}: {literal!r}" for literal in literals]
    return found


def test_no_method_name_is_compared_as_a_string_outside_the_method_modules():
    names = builtin_method_names()
    assert names == {"full", "dreambooth", "textual_inversion", "lora"}
    found = [
        use
        for path in sorted(PACKAGE.rglob("*.py"))
        if not any(path == m or m in path.parents for m in METHOD_MODULES)
        for use in method_name_uses(path, names)
    ]
    assert found == [], "ask the method's MethodSpec instead:\n" + "\n".join(found)


def test_the_name_check_sees_the_forms_it_forbids(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        'a = m == "lora"\nb = m in ("full", "dreambooth")\nc = {"textual_inversion": 1}\nd = {"lora"}\n'
        'e = "lora" + "x"\n'
    )
    uses = method_name_uses(sample, {"full", "dreambooth", "textual_inversion", "lora"})
    assert [u.split(": ", 1)[1] for u in uses] == [
        "'lora'",
        "'full'",
        "'dreambooth'",
        "'textual_inversion'",
        "'lora'",
    ]
