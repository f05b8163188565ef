"""Block-size trials, shared by the tune steps: a launcher's configuration function patched with each trial's
entries, forward + backward timed, every trial recorded, the fastest named."""

from __future__ import annotations

import math

from .markdown import error_text
from .runner import Context
from .timing import time_trial

TUNE_REPS = 5
LOSS_TOLERANCE = 1e-3  # relative: a trial whose loss differs more from the first trial's is "wrong"
SHORT_KEYS = {"BLOCK_N": "N", "BLOCK_V": "V", "BLOCK_H": "H", "BLOCK_R": "R", "num_warps": "w", "num_stages": "s",
              "split_size": "split"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def patched_fused_config(original, override: dict):
    """`original` (kdops.launchers.linear.fused_config(n_rows, vocab, gpu, ...)) with `override`'s entries, and the
    vocabulary split re-derived so that the forward launches as many programs as with kdops' own tiles.
    `override` may instead hold a "forward" and / or a "backward" dict: entries for that kernel alone."""
    def config(n_rows, vocab, gpu, *args, **kwargs):
        base = original(n_rows, vocab, gpu, *args, **kwargs)
        entries = override
        if "forward" in override or "backward" in override:
            entries = override.get("forward" if kwargs.get("forward") else "backward", {})
        if not entries:
            return base
        cfg = {**base, **entries}
        programs = _cdiv(vocab, base["split_size"]) * _cdiv(n_rows, base["BLOCK_N"])
        splits = max(1, programs // _cdiv(n_rows, cfg["BLOCK_N"]))
        cfg["split_size"] = _cdiv(_cdiv(vocab, splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
        return cfg
    return config


def patched_logits_config(original, override: dict):
    """`original` (kdops.launchers.logits.logits_config(n_rows, vocab, gpu, ...)) with `override`'s entries."""
    def config(n_rows, vocab, gpu, *args, **kwargs):
        return {**original(n_rows, vocab, gpu, *args, **kwargs), **override}
    return config


def config_text(config: dict) -> str:
    """'N64 V128 w8 s3': a configuration in a table cell."""
    return " ".join(f"{SHORT_KEYS.get(k, k)}{v}" for k, v in config.items())


def run_trial(ctx: Context, module, attribute: str, chosen, steps, inputs, reps: int, row: dict) -> dict:
    """`row` with the trial's times and loss ("failed" where it does not compile or run) and the configuration
    the launchers were given, `module.attribute` replaced by `chosen` meanwhile."""
    original, used = getattr(module, attribute), []

    def spy(*args, **kwargs):  # what the launchers are given
        config = chosen(*args, **kwargs)
        used.append(dict(config))
        return config

    setattr(module, attribute, spy)
    try:
        row["forward_ms"], row["backward_ms"], row["total_ms"], row["loss"] = time_trial(steps, inputs, ctx.device,
                                                                                         reps)
    except Exception as error:  # noqa: BLE001 - compile errors, shared memory or registers exhausted
        row["status"], row["message"] = "failed", error_text(error)
    finally:
        setattr(module, attribute, original)
        inputs.clear_grads()
    row["config"] = used[0] if used else row["config"]
    return row


def judge_loss(row: dict, reference_loss: float) -> None:
    """Mark `row` "wrong" where its loss differs from the reference trial's by more than LOSS_TOLERANCE."""
    if not (math.isfinite(row["loss"])
            and abs(row["loss"] - reference_loss) <= LOSS_TOLERANCE * max(abs(reference_loss), 1e-12)):
        row["status"], row["message"] = "wrong", f"loss {row['loss']:.6g} vs {reference_loss:.6g}"


def report_trials(ctx: Context, target: str, what: str, case, rows: list[dict], reps: int) -> None:
    """Record the fastest trial; the trials' table, each against the default's time."""
    ok = [r for r in rows if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["total_ms"]) if ok else None
    default = next((r for r in ok if r["default"]), None)
    if best is not None:
        ctx.record("tune_best", target=target, label=case.label, config=best["config"], total_ms=best["total_ms"],
                   default_total_ms=default["total_ms"] if default else None, trial=best["trial"])
    ctx.line("")
    ctx.line(f"**{target}** (`{what}`) at {case.label}, forward + backward, median of {reps}:")
    ctx.line("")
    ctx.table(["trial", "config", "status", "fwd ms", "bwd ms", "total ms", "× default"],
              [[("default" if r["default"] else str(r["trial"])) + (" **fastest**" if r is best else ""),
                config_text(r["config"]), r["status"] + (f": {r['message']}" if r["message"] else ""),
                r["forward_ms"], r["backward_ms"], r["total_ms"],
                (r["total_ms"] / default["total_ms"]) if default and r["total_ms"] else None] for r in rows])
    if rows and not ok:
        ctx.mark("failed", f"no {target} configuration ran")


def tune(ctx: Context, target: str, module, attribute: str, patch, trials, case, loss_fn, trial_s: float,
         reps: int = TUNE_REPS) -> list[dict]:
    """Time `loss_fn` forward + backward on `case` with `module.attribute` patched by each of `trials`;
    record every trial (a failure to compile or run is a "failed" trial; a loss that differs from the first
    trial's by more than 1e-3 is "wrong") and return the records."""
    from bench.measure import free_memory, make_inputs

    original = getattr(module, attribute)
    inputs = make_inputs(case, ctx.device)
    steps = [lambda: loss_fn(*inputs.args), lambda loss: loss.backward()]
    rows, reference_loss = [], None
    try:
        for i, override in enumerate(trials):
            note = f"{target}: {len(trials) - i} configuration(s) skipped, {ctx.left():.0f} s left"
            if not ctx.skip_unless_fits(trial_s, "configurations", note):
                break
            row = dict(target=target, label=case.label, trial=i, default=not override, config=dict(override),
                       status="ok", message="", forward_ms=None, backward_ms=None, total_ms=None, loss=None)
            run_trial(ctx, module, attribute, patch(original, override), steps, inputs, reps, row)
            if row["status"] == "ok":
                if reference_loss is None:
                    reference_loss = row["loss"]
                else:
                    judge_loss(row, reference_loss)
            if row["status"] == "failed":
                free_memory(ctx.device)
            ctx.record("tune", **row)
            rows.append(row)
    finally:
        setattr(module, attribute, original)
        del inputs
        free_memory(ctx.device)
    report_trials(ctx, target, f"{module.__name__}.{attribute}", case, rows, reps)
    return rows
