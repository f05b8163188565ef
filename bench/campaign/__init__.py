"""`python -m bench.campaign`, the one-call GPU campaign (what it runs and writes: bench/campaign/cli.py).

Each step is a `runner.Step` — its name, estimate, plan lines, body and environment — declared in the module of
its family; every step runs through the one runner:

* runner.py     Step, Context (a step's output, records, deadline), Budget, run_steps, the step's process and
                its kill;
* plan.py       every step in order, the default ones and budget, the dry run's plan;
* report.py     the markdown report and the output folder's README.md;
* metadata.py   what every record carries; predictions.py: the cost model at the headline shape;
* the steps     smoke.py, fused_check.py, memory.py, headline.py, fronts.py, trainer_step.py, profile.py (its
                timeline analysis: timeline.py), tune.py and tune_headline.py (their trials: tuning.py,
                timing.py), probe.py;
* cli.py        the command line; markdown.py: cells, tables and errors as text.

Imports go one way: __main__ → cli → plan, report, predictions, metadata; plan → each step's module; profile →
predictions, timeline, timing; predictions, fused_check, fronts, tune_headline → headline; tune, tune_headline → tuning
→ timing; every step, plan and report → runner → markdown. This file imports nothing, so that `python -m
bench.campaign` starts its clock (__main__.py) before the heavy imports.
"""
