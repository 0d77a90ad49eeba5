"""What ``python -m sdsweep`` does with a composed config: validate, run, and say where results are.

Bad input is reported as one paragraph and exit code 2, before any model is loaded.
``--plan`` (``print_plan``) shows the effective grid and the run plan, and runs nothing.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sdsweep.config.load import to_typed
from sdsweep.config.resolve import lr_ranges
from sdsweep.errors import ConfigError, SweepStopped
from sdsweep.results.study_folder import is_feasible


class UserError(Exception):
    """Input the user can fix; printed without a traceback."""


def preflight(overrides: list[str], requested=None) -> None:
    """Cheap checks that would otherwise fail after minutes of work (sdsweep.sweep.preflight)."""
    from sdsweep.sweep.preflight import PreflightError, run_preflight

    try:
        run_preflight(overrides, requested)
    except PreflightError as error:
        raise UserError(str(error)) from None


def run_from_config(raw: DictConfig, overrides: list[str] | None = None) -> int:
    from sdsweep.sweep.driver import run_sweep
    from sdsweep.sweep.run_config import fix_up, settle

    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    try:
        # The one build of the sweep's config (Hydra composed ``raw`` already): typed, normalised and
        # validated, fixed up; the preflight judges it, then the sweep runs it (run_config.build_config).
        requested = fix_up(to_typed(raw))
        preflight(overrides, requested)
        cfg = settle(requested)
    except (ConfigError, UserError) as error:
        print(f"sdsweep: error: {error}", file=sys.stderr)
        return 2
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", "") or str(error)
        print(
            f"sdsweep: error: the config value {key} is required but not set; add {key}=<value> to the command line.",
            file=sys.stderr,
        )
        return 2
    except OmegaConfBaseException as error:
        print(f"sdsweep: error: invalid configuration: {error}", file=sys.stderr)
        return 2
    from sdsweep.progress import quiet_library_bars

    quiet_library_bars()  # our own progress lines instead of per-file weight-loading bars
    try:
        outcome = run_sweep(overrides, cfg)
    except ConfigError as error:  # e.g. the study's data changed while the sweep ran
        print(f"sdsweep: error: {error}", file=sys.stderr)
        return 2
    except SweepStopped as error:
        print(f"sdsweep: error: {error}", file=sys.stderr)
        return error.exit_code
    _print_closing_lines(outcome)
    return 0


def _print_closing_lines(outcome) -> None:
    """Where the results are, the trials' fates, the best trial and the verdict on it, as the sweep ends."""
    from sdsweep.sweep.engine import log

    log(f"results: {outcome.results_csv}")
    log(f"study folder: {outcome.study_dir} (per-trial configs, metrics, samples and weights under trials/)")
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(outcome.states.items()))
    if states:
        log(f"trials: {states}")
    if outcome.best:
        best = outcome.best
        weights = best.get("weights_dir")  # relative to the study folder, as results.csv holds it
        log(
            f"best trial: {best.get('trial')} (objective {best.get('objective')}) weights: {outcome.study_dir / weights if weights else 'removed'}"
            + (
                ""
                if is_feasible(best.get("feasible"))
                else " (no trial meets the constraints; this one violates them)"
            )
        )
    if outcome.verdict is not None:
        log(f"verdict: {outcome.verdict.sentence()}")
        if outcome.verdict.uncertain_sentence():
            log(outcome.verdict.uncertain_sentence())
        if outcome.verdict.separated is False:
            log(f"to separate them: python -m sdsweep.confirm {outcome.study_dir}")
    log(f"W&B (offline): wandb sync {outcome.study_dir}/wandb/wandb/offline-run-*")


def plan_text(cfg) -> str:
    """The effective search space, the training runs it becomes and their cost, as a person reads it.

    Uses the typed config, so shorthands such as ``sweep.steps=[...]`` are already applied: this is
    the grid the sweep will run, not the YAML's choices. Pure: no storage, model or data is touched.
    """
    lines = [
        f"study '{cfg.study}' -> {cfg.paths.root}/{cfg.study}",
        f"model {cfg.model.name}, method {cfg.method.name}, data {cfg.data.kind}, device {cfg.device}",
    ]
    if cfg.sweep is None:
        return "\n".join(lines + _single_run_plan(cfg))
    lines += _search_space_lines(cfg.sweep)
    if cfg.sweep.sampler != "grid":
        return "\n".join(lines + _sampled_plan(cfg))
    return "\n".join(lines + _grid_plan(cfg))


def _single_run_plan(cfg) -> list[str]:
    """Without ``+sweep``: one training run and its evaluation."""
    steps = cfg.train.max_train_steps
    return [
        f"no +sweep: one training run of {steps} steps, evaluated once (plus the baseline)",
        f"estimated training steps: {steps}",
    ]


def _search_space_lines(sweep) -> list[str]:
    """The sampler, objectives and constraints, then each searched parameter's choices or range."""
    objectives = ", ".join(f"{o.metric} ({o.direction})" for o in sweep.objectives)
    lines = [f"sweep {sweep.name}: {sweep.sampler} sampler, objective {objectives}"]
    lines += [f"  constraint: {constraint}" for constraint in sweep.constraints]
    lines.append("search space:")
    lines += [f"  {key}: {_range_text(spec)}" for key, spec in sorted(sweep.params.items())]
    if sweep.sampler != "grid":  # a grid plans its points up front and draws no per-method range
        ranges = lr_ranges(sweep)
        if ranges:
            lines.append("  own learning-rate ranges (a model/method pair's first, else the method's):")
        lines += [f"    {name}: {_range_text(spec)}" for name, spec in sorted(ranges.items())]
    return lines


def _range_text(spec) -> str:
    """A searched parameter's choices (``a, b``) or range (``low .. high (log)``)."""
    if spec.choices is not None:
        return ", ".join(str(c) for c in spec.choices)
    low, high = (int(spec.low), int(spec.high)) if spec.type == "int" else (spec.low, spec.high)
    return f"{low} .. {high}{' (log)' if spec.log else ''}"


def _sampled_plan(cfg) -> list[str]:
    """A sampled search: ``n_trials`` runs of the mean step count, at most (pruning stops some early)."""
    from sdsweep.study.plan import STEP_KEY

    sweep = cfg.sweep
    trials = sweep.n_trials or 20
    step_spec = sweep.params.get(STEP_KEY)
    if step_spec is not None and step_spec.choices is None:
        mean_steps = (float(step_spec.low) + float(step_spec.high)) / 2
    elif step_spec is not None:
        mean_steps = sum(step_spec.choices) / len(step_spec.choices)
    else:
        mean_steps = cfg.train.max_train_steps
    return [
        f"run plan: {trials} sampled trials, one training run each (pruner {sweep.pruner})",
        f"estimated training steps: about {int(trials * mean_steps)} (at most; pruning stops some early)",
        f"evaluations: {trials} + {_baseline_count(cfg)} baseline",
    ]


def _grid_plan(cfg) -> list[str]:
    """A grid: its points grouped into training runs (milestone sharing), their steps and the noise floor."""
    from sdsweep.study.plan import STEP_KEY, grid_points, plan_runs, short_params

    sweep = cfg.sweep
    points = grid_points(sweep.params) if sweep.params else [{}]
    if sweep.n_trials is not None:
        points = points[: sweep.n_trials]
    runs = plan_runs(points, cfg, sweep.share_milestones)
    total_steps = 0
    lines = [f"grid: {len(points)} points in {len(runs)} training run(s)"]
    for index, run in enumerate(runs, 1):
        steps = [int(p.get(STEP_KEY, cfg.train.max_train_steps)) for p in run.points]
        total_steps += max(steps)
        what = f"milestones {'/'.join(map(str, steps))}" if run.shared else f"{steps[0]} steps"
        lines.append(f"  run {index}: {short_params(run.base) or 'config as given'} ({what})")
    unshared = sum(int(p.get(STEP_KEY, cfg.train.max_train_steps)) for p in points)
    saving = f" ({unshared} without milestone sharing)" if unshared != total_steps else ""
    lines.append(f"estimated training steps: {total_steps}{saving}")
    lines.append(f"evaluations: {len(points)} + {_baseline_count(cfg)} baseline")
    lines.append(noise_line(cfg))
    lines.append("already finished points are skipped when the study is resumed.")
    return lines


def _baseline_count(cfg) -> int:
    """1 when the untuned model is evaluated as the study's baseline, else 0."""
    return 1 if cfg.eval.baseline else 0


def noise_line(cfg) -> str:
    """How finely one evaluation can tell two trials apart, from an existing baseline's unit-to-unit spread."""
    from sdsweep import io
    from sdsweep.evaluation.units import read_units_or_none
    from sdsweep.results.verdict import noise_statement

    ev = cfg.eval
    units = len(ev.prompts) * ev.num_images_per_prompt if ev.protocol == "prompts" else "held-out"
    objective = cfg.sweep.objectives[0] if cfg.sweep and cfg.sweep.objectives else None
    metric = objective.metric if objective else "eval/clip_score"
    baseline = read_units_or_none(io.StudyPaths.of(cfg.paths.root, cfg.study).baseline)
    said = noise_statement(baseline, metric)
    if said:
        return f"noise: {said}"
    return (
        f"noise: each trial is judged on {units} evaluation units (prompt x seed); the study's baseline gives "
        f"{metric}'s standard error and the smallest resolvable difference once it is evaluated (report, --plan)"
    )


def print_plan(raw: DictConfig) -> int:
    """``sdsweep --plan ...``: validate, print ``plan_text``, exit; nothing is loaded or trained."""
    try:
        cfg = to_typed(raw)
    except (ConfigError, OmegaConfBaseException) as error:
        print(f"sdsweep: error: {error}", file=sys.stderr)
        return 2
    print(plan_text(cfg))
    print("(plan only: nothing was loaded or trained; drop --plan to run it)")
    return 0
