"""Per-model lr ranges (sweep.learning_rate_by_model_method, #29 item 4): validated against the swept choices,
listed by --plan, drawn as their own Optuna parameter and recorded as method.learning_rate. Nothing trains."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY_OVERRIDES, compose

from sdsweep.errors import ConfigError

LR = "method.learning_rate"
TINY_MODELS = "sweep.params.model.choices=[tiny,tiny_sdxl]"
TWO_METHODS = "sweep.params.method.choices=[full,lora]"
# Disjoint from learning_rate_by_method's lora range (3e-5 .. 1e-3), so a draw shows which range it came from.
SDXL_LORA = "+sweep.learning_rate_by_model_method={tiny_sdxl/lora: {low: 1e-8, high: 1e-7, log: true}}"


def methods_sweep(*extra: str) -> list[str]:
    return TINY_OVERRIDES + ["+sweep=methods", TINY_MODELS, TWO_METHODS, *extra]


@pytest.mark.parametrize(
    "pair, says",
    [
        ("sdxl/lora", r"model 'sdxl' is not among the swept model choices \['tiny', 'tiny_sdxl'\]"),
        (
            "tiny_sdxl/dreambooth",
            r"method 'dreambooth' is not among the swept method choices \['full', 'lora'\]",
        ),
        ("tiny_sdxl", r"name a model and a method as <model>/<method>"),
    ],
)
def test_a_pair_that_is_never_drawn_is_one_config_error_listing_the_swept_choices(pair, says):
    override = f"+sweep.learning_rate_by_model_method={{{pair}: {{low: 1e-5, high: 1e-4, log: true}}}}"
    with pytest.raises(ConfigError, match=rf"sweep.learning_rate_by_model_method.{pair}=.*{says}"):
        compose(methods_sweep(override))


PAIR = "+sweep.learning_rate_by_model_method="  # not in conf/sweep/methods.yaml: added with '+'
METHOD = "sweep.learning_rate_by_method="


@pytest.mark.parametrize(
    "override, says",
    [
        (
            PAIR + "{tiny_sdxl/lora: {low: 1e-4, high: 1e-5}}",
            r"model_method\.tiny_sdxl/lora=.*low must not exceed",
        ),
        (PAIR + "{tiny_sdxl/lora: {low: 0.0, high: 1e-5, log: true}}", r"tiny_sdxl/lora\.low=0\.0.*low > 0"),
        (METHOD + "{lora: {low: 1e-4, high: 1e-5}}", r"by_method\.lora=.*low must not exceed high"),
        (METHOD + "{lora: {choices: [0.0, 1e-4]}}", r"by_method\.lora=.*greater than zero"),
    ],
)
def test_a_bad_lr_range_is_named_like_a_bad_sweep_param(override, says):
    with pytest.raises(ConfigError, match=rf"sweep\.learning_rate_.*{says}"):
        compose(methods_sweep(override))


def test_a_grid_refuses_per_method_ranges_it_would_ignore_as_typed(tmp_path):
    """`+sweep=methods sweep.sampler=grid` used to train every method at the recipe's lr, silently."""
    command = [
        sys.executable,
        "-m",
        "sdsweep",
        "+sweep=methods",
        "sweep.sampler=grid",
        f"paths.root={tmp_path}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert (
        "sweep.learning_rate_by_method.full=" in done.stderr and "sweep.sampler=tpe or random" in done.stderr
    )
    assert "'~sweep.learning_rate_by_method.lora'" in done.stderr  # each range's removal, ready to paste
    assert done.stderr.count("sdsweep: error") == 1
    written = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert written == ["__main__.log"], written  # Hydra's log of the attempt; no study, no baseline
    pair = "+sweep.learning_rate_by_model_method={tiny_sdxl/lora: {choices: [1e-5]}}"
    grid = [*TINY_OVERRIDES, "+sweep=methods_shapes", "sweep.params.model.choices=[tiny,tiny_sdxl]", pair]
    with pytest.raises(ConfigError, match=r"by_model_method\.tiny_sdxl/lora=.*draws only sweep\.params"):
        compose(grid)


def test_plan_lists_each_drawn_range_with_the_pairs_own(tmp_path):
    args = [*methods_sweep(SDXL_LORA), f"paths.root={tmp_path}", "--plan"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "sdsweep", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert f"    {LR}[tiny_sdxl/lora]: 1e-08 .. 1e-07 (log)" in out
    assert f"    {LR}[lora]: 3e-05 .. 0.001 (log)" in out and f"    {LR}[full]: 1e-06 .. 5e-05 (log)" in out
    assert f"{LR}[dreambooth]" not in out  # not swept here: nothing draws it


def test_a_search_draws_the_pairs_range_else_the_methods_and_records_one_name(tmp_path):
    """Storage-level (sqlite, as a sweep's driver uses it): draws only, no run."""
    from sdsweep.study.store import StudyHandle
    from sdsweep.sweep.claims import Claims
    from sdsweep.sweep.ledger import StudyLedger
    from sdsweep.sweep.search import SearchClaims

    cfg = compose(methods_sweep(SDXL_LORA, "sweep.n_trials=16", f"paths.root={tmp_path}"))
    handle = StudyHandle(cfg, f"sqlite:///{tmp_path / 'search.db'}", "search")
    claims = Claims(handle, cfg.sweep, "host driver [one]", "one")
    search = SearchClaims(
        cfg, handle, claims, StudyLedger(handle, cfg.sweep, claims, retry_below=0), say=print
    )
    own_pair = {"tiny_sdxl/lora": (1e-8, 1e-7)}  # the per-model range wins for its pair ...
    by_method = {"lora": (3e-5, 1e-3), "full": (1e-6, 5e-5)}  # ... conf/sweep/methods.yaml's otherwise
    drawn = set()
    for i in range(16):
        _, [slot] = search.draw(f"{i + 1}/16")
        model, method = slot.params["model"], slot.params["method"]
        pair = f"{model}/{method}"
        low, high = own_pair.get(pair) or by_method[method]
        assert low <= slot.params[LR] <= high, (pair, slot.params)
        params = handle.get_trial(slot.number).params
        assert f"{LR}[{pair if pair in own_pair else method}]" in params  # its own Optuna parameter ...
        assert LR not in params and search.point_of(params) == slot.params  # ... recorded under one name
        drawn.add(pair)
    assert {"tiny_sdxl/lora", "tiny/lora", "tiny_sdxl/full", "tiny/full"} <= drawn
    # No trial wrote a record (none ran): the result table fills them from Optuna, under the one name too.
    from sdsweep import io
    from sdsweep.results.table import trial_rows

    rows = trial_rows(io.StudyPaths(tmp_path / "search"), handle.trials())
    assert len(rows) == 16 and all(LR in row and not any("[" in key for key in row) for row in rows)
