"""The printed table: renders results (as written to results.json) and reads nothing else."""

from __future__ import annotations

from typing import Any


def table(results: dict[str, Any]) -> str:
    """The whole ``python -m bench`` table; a section not run is left out (the GPU one says so)."""
    lines = ["", "sdsweep bench " + results["machine"]["date"], ""]
    for number, key, render in (
        ("1", "sweep", sweep_cost_lines),
        ("2", "step", step_lines),
        ("3", "eval", eval_lines),
    ):
        if key in results:
            lines += [*section_lines(number, results[key], render), ""]
    lines += gpu_lines(results.get("gpu", {}))
    if "parallel" in results:
        lines += ["", "5. " + parallel_table(results["parallel"])]
    if "racing" in results:
        lines += ["", *section_lines("6", results["racing"], racing_lines)]
    lines += ["", "Targets:"]
    lines += verdict_lines(results.get("verdicts", {}), width=22)
    return "\n".join(lines)


def section_lines(number: str, section: dict[str, Any], render) -> list[str]:
    if "error" in section:
        return [f"{number}. failed ({section['error']})"]
    lines = render(section)
    return [f"{number}. {lines[0]}", *lines[1:]]


def sweep_cost_lines(sweep: dict[str, Any]) -> list[str]:
    grid = sweep["grid"]
    lines = [
        f"Sweep cost, tiny model, grid lr {grid['learning_rates']} x steps {grid['steps']}",
        f"   {'arm':<18}{'wall s':>9}{'runs':>6}{'trials':>8}{'x plain':>9}",
    ]
    for arm, row in sweep["arms"].items():
        lines.append(
            f"   {arm:<18}{row['wall_seconds']:>9.1f}{row['runs_launched']:>6}{row['trials_launched']:>8}"
            f"{row['ratio_to_plain']:>9.2f}"
        )
    if "subprocess_overhead" in sweep:
        lines.append(
            f"   subprocess isolation costs {sweep['subprocess_overhead']:.2f}x the in-process full arm"
        )
    return lines


def racing_lines(racing: dict[str, Any]) -> list[str]:
    full, raced = racing["full"], racing["raced"]
    return [
        f"Racing, tiny model, grid lr {racing['grid']['learning_rates']} x steps {racing['grid']['steps']}: "
        f"{racing['start_per_prompt']} images/prompt then confirmation, vs {racing['full_per_prompt']} for every trial",
        f"   full: {full['images']} images, pick trial {full['best']} {full['configuration']}",
        f"   raced: {raced['images']} images, pick trial {raced['best']} {raced['configuration']}",
        f"   images raced / full {racing['ratio_images_raced_vs_full']:.2f}, same pick: {racing['same_pick']}"
        f" (raced pick among the full evaluation's tied set: {racing['raced_pick_in_full_tied_set']})",
    ]


def step_lines(step: dict[str, Any]) -> list[str]:
    return [
        f"Per-step time, tiny model, batch {step['batch_size']}, {step['resolution']} px (median)",
        f"   sdsweep train(): {step['sdsweep_median_step_seconds'] * 1e3:.1f} ms   "
        f"bare loop: {step['bare_median_step_seconds'] * 1e3:.1f} ms   ratio {step['ratio']:.3f}",
    ]


def eval_lines(ev: dict[str, Any]) -> list[str]:
    lines = [f"Sampling throughput, tiny model, {ev['resolution']} px, batch {ev['batch_size']}"]
    for name, row in ev["samplers"].items():
        lines.append(
            f"   {name:<12}{row['num_inference_steps']:>4} steps {row['images_per_second']:>8.2f} img/s"
        )
    lines.append(f"   speedup {ev['speedup']:.2f}x")
    return lines


def gpu_lines(gpu: dict[str, Any]) -> list[str]:
    if "error" in gpu:
        return [f"4. Training path: failed ({gpu['error']})"]
    if not gpu:
        return ["4. Training path: not run"]
    note = "" if gpu["measured_on_gpu"] else " (GPU figures not measured)"
    lines = [
        f"4. Training path: {gpu['device_name']}, {gpu['model']}{note}",
        f"   {'method':<19}{'batch':>6}{'ckpt':>6}{'cache':>7}{'img/s':>9}{'MFU unet':>9}{'MFU e2e':>8}"
        f"{'pred GiB':>9}{'peak GiB':>9}",
    ]
    for row in gpu["training"]:
        head = (
            f"   {row['method']:<19}{row['batch_size']:>6}{str(row['gradient_checkpointing'])[0]:>6}"
            f"{str(row['latent_cache'])[0]:>7}"
        )
        if "error" in row:
            lines.append(f"{head}  {row['error'][:60]}")
            continue
        lines.append(
            f"{head}{row['images_per_second']:>9.2f}{fmt(row['mfu_unet']):>9}{fmt(row['mfu_end_to_end']):>8}"
            f"{fmt(row['predicted_peak_gib']):>9}{fmt(row['measured_peak_gib']):>9}"
        )
    for s in gpu["sampling"]:
        if "error" in s:
            lines.append(f"   sampling {s['dtype']}: failed ({s['error'][:60]})")
        else:
            lines.append(
                f"   sampling {s['dtype']}: {s['num_inference_steps']} steps, {s['images_per_second']:.2f} img/s"
            )
    return lines


def parallel_table(section: dict[str, Any]) -> str:
    """The parallel section's lines (also what ``python -m bench.parallel`` prints)."""
    if "error" in section:
        return f"Parallel: failed ({section['error']})"
    w, i = section["workers"], section["isolation"]
    lines = [
        f"Parallel sweeps ({section['cpu_count']} CPU cores)",
        f"   workers, grid lr {w['grid']['learning_rates']} x steps {w['grid']['steps']} (4 independent runs)",
    ]
    lines += [f"   {arm:<12}{arm_cells(row)}" for arm, row in w["arms"].items()]
    lines.append(f"   2 workers / 1 worker: {w['ratio_2_vs_1']:.2f}x")
    lines.append(f"   isolation, grid lr {i['grid']['learning_rates']} x steps {i['grid']['steps']}")
    lines += [
        f"   {arm:<12}{arm_cells(row)}{row['ratio_to_plain']:>7.2f}x plain" for arm, row in i["arms"].items()
    ]
    lines.append(f"   default / in-process: {i['ratio_default_vs_inprocess']:.2f}x")
    lines += verdict_lines(section.get("verdicts", {}), width=20)
    return "\n".join(lines)


def arm_cells(row: dict[str, Any]) -> str:
    return f"{row['wall_seconds']:>8.1f} s{row['cpu_seconds']:>8.1f} s CPU{row['runs_launched']:>4} runs"


def verdict_lines(verdicts: dict[str, Any], width: int) -> list[str]:
    return [
        f"   {key:<{width}}{v['value']:>8.3f}  {v['target']:<7} {'PASS' if v['pass'] else 'FAIL'}"
        for key, v in verdicts.items()
    ]


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"
