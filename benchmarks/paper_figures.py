"""The shape of the paper's Figures 2, 6, 7a–d and 9a on the offline ``digits`` task, FlexLoRA vs
raFLoRA over 3 seeds, written up claim by claim in ``docs/reproduction.md``.

Every run is an ordinary run directory of :mod:`raflora.experiments.sweep` (one sweep per study
under ``--out``, each with its ``sweep.md`` / ``sweep.json`` / plots), so rerunning the same command
skips the finished runs and resumes an interrupted one. The studies (:data:`STUDIES`) start from
``configs/quickstart.yaml`` (50 clients, 10 a round, ``dir-a0.5``, 40 rounds) with the paper's
default ranks ``{8, 16, 32, 48, 64}`` (``dist-1``):

- Figure 7a / 2c / 6: ``data.partition`` from IID to ``dir-a0.1``;
- Figure 7b: ``fl.clients_per_round`` 5, 10, 20 (10 %, 20 %, 40 % participation);
- Figure 7c / 2d: rank configurations ``conf-1…5`` on a 128-wide ViT (``conf-5`` has rank 128);
- Figure 7d / 2a–b: rank distributions ``dist-1…4``;
- Figure 9a: ``conf-6…8`` on a 256-wide ViT (``conf-8`` has rank 256).

A LoRA rank cannot exceed the adapted layers' ``min(d, n)``: the digits ViT is 64 wide by
default (``task.options.hidden_dim``), wide enough for ranks up to 64; only the studies with
larger ranks pay for a wider model.

Usage::

    .venv/bin/python benchmarks/paper_figures.py            # ≈ 30–40 min on 2 CPU cores
    .venv/bin/python benchmarks/paper_figures.py --quick    # smoke run: a few minutes
    .venv/bin/python benchmarks/paper_figures.py --out runs/paper-figures --docs docs --jobs 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raflora.experiments.sweep import (
    RunOutcome,
    RunSpec,
    Setting,
    SweepError,
    parse_grid,
    settings_of,
)

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "quickstart.yaml"
DEFAULT_RANKS = REPO / "configs" / "paper" / "ranks" / "dist-1.yaml"
BASELINE = "flexlora"
METHOD = "raflora"
METHODS = (BASELINE, METHOD)
SEEDS = (0, 1, 2)
ROUNDS = 40
QUICK_ROUNDS = 6
EVAL_EVERY = 4
QUICK_EVAL_EVERY = 3
METRICS = (
    "final_accuracy",
    "best_accuracy",
    "final_higher_rank_energy",
    "mean_higher_rank_energy",
    "traffic",
)
ACC = "final_accuracy"
HRE = "final_higher_rank_energy"


@dataclass(frozen=True)
class Study:
    """One sensitivity study: a sweep of one config key (or rank preset) for both methods.

    Attributes
    ----------
    key : str
        Its directory under ``--out``.
    figure : str
        The paper's figure it reproduces.
    title : str
        What varies.
    axis : str
        The grid key (``preset`` for rank presets).
    values : tuple[str, ...]
        The grid values, in the figure's order (``--quick`` keeps the first and the last).
    files : tuple[Path, ...]
        Config files merged after the base config.
    overrides : tuple[str, ...]
        ``key=value`` overrides of this study.
    quick_values : tuple[str, ...] or None
        The two values ``--quick`` runs (default: the first and the last).
    """

    key: str
    figure: str
    title: str
    axis: str
    values: tuple[str, ...]
    files: tuple[Path, ...] = ()
    overrides: tuple[str, ...] = ()
    quick_values: tuple[str, ...] | None = None

    def grid_values(self, quick: bool) -> tuple[str, ...]:
        """The values run: all of them, or two in quick mode (``quick_values``, else the first
        and the last).
        """
        if not quick:
            return self.values
        return self.quick_values or (self.values[0], self.values[-1])

    def grid(self, quick: bool) -> str:
        """The ``--grid`` argument of this study."""
        return f"{self.axis}={','.join(self.grid_values(quick))}"


STUDIES = (
    Study(
        "rank-gaps",
        "9a",
        "rank configurations with growing rank gaps (256-wide ViT)",
        "preset",
        ("conf-6", "conf-7", "conf-8"),
        overrides=("task.options.hidden_dim=256",),
    ),
    Study(
        "rank-configurations",
        "7c",
        "rank configurations (128-wide ViT)",
        "preset",
        ("conf-1", "conf-2", "conf-3", "conf-4", "conf-5"),
        overrides=("task.options.hidden_dim=128",),
    ),
    Study(
        "non-iid",
        "7a",
        "data heterogeneity",
        "data.partition",
        ("iid", "dir-a1.0", "dir-a0.5", "dir-a0.1"),
        files=(DEFAULT_RANKS,),
    ),
    Study(
        "participation",
        "7b",
        "client participation rate (of 50 clients)",
        "fl.clients_per_round",
        ("5", "10", "20"),
        files=(DEFAULT_RANKS,),
    ),
    Study(
        "rank-distributions",
        "7d",
        "rank distributions over {8, 16, 32, 48, 64}",
        "preset",
        ("dist-1", "dist-2", "dist-3", "dist-4"),
        quick_values=("dist-1", "dist-2"),  # dist-2: the low-rank-skewed claim
    ),
)
"""Most expensive first, so that parallel workers finish together."""

BY_KEY = {s.key: s for s in STUDIES}

# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Every run of every study, and where its settings are."""

    studies: dict[str, list[Setting]] = field(default_factory=dict)
    specs: list[RunSpec] = field(default_factory=list)


def common_overrides(quick: bool) -> list[str]:
    """Overrides every study shares: the rounds and the evaluation period."""
    rounds, every = (QUICK_ROUNDS, QUICK_EVAL_EVERY) if quick else (ROUNDS, EVAL_EVERY)
    return [f"fl.rounds={rounds}", f"eval.every={every}"]


def rank_width_problems(specs: Sequence[RunSpec]) -> list[str]:
    """Runs whose largest rank exceeds the digits ViT's width (``task.options.hidden_dim``):
    a LoRA rank cannot exceed ``min(d, n)`` of the adapted layers (each setting reported once).
    """
    from raflora.tasks.digits import DigitsOptions

    problems: list[str] = []
    for spec in specs:
        width = DigitsOptions.from_mapping(spec.config.task.options).hidden_dim
        largest = max(spec.config.fl.rank_levels)
        text = (
            f"{spec.setting.label}: rank {largest} exceeds the ViT width {width} "
            "(set task.options.hidden_dim)"
        )
        if largest > width and text not in problems:
            problems.append(text)
    return problems


def build_plan(out: Path, *, quick: bool, seeds: Sequence[int]) -> Plan:
    """Load and validate every study's runs (every problem reported before anything runs).

    Raises
    ------
    SweepError
        With the problems of every study, each prefixed by the study.
    """
    from raflora.experiments.sweep import plan_runs

    plan = Plan()
    problems: list[str] = []
    for study in STUDIES:
        try:
            settings = settings_of([parse_grid(study.grid(quick))])
            specs = plan_runs(
                [BASE_CONFIG, *study.files],
                [*common_overrides(quick), *study.overrides],
                settings,
                METHODS,
                seeds,
                out / study.key,
            )
        except SweepError as err:
            problems += [f"[{study.key}] {p}" for p in err.problems]
            continue
        problems += [f"[{study.key}] {p}" for p in rank_width_problems(specs)]
        plan.studies[study.key] = settings
        plan.specs += specs
    if problems:
        raise SweepError(problems)
    return plan


# --------------------------------------------------------------------------- the results


Summaries = dict[int, dict[str, Any]]
"""Seed → a run's summary."""


@dataclass
class Results:
    """Per study: setting value (as typed) → method → seed → summary, and the run dirs."""

    cells: dict[str, dict[str, dict[str, Summaries]]] = field(default_factory=dict)
    run_dirs: dict[tuple[str, str, str, int], Path] = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def values(self, study: str, value: str, method: str, metric: str) -> dict[int, float]:
        """Seed → the metric of one method at one setting (finished runs only)."""
        from raflora.experiments.report import metric_value

        out: dict[int, float] = {}
        for seed, summary in self.cells[study].get(value, {}).get(method, {}).items():
            v = metric_value(summary, metric)
            if v is not None:
                out[seed] = v
        return out


def collect(plan: Plan, outcomes: Sequence[RunOutcome]) -> Results:
    """Sort the outcomes by study, setting, method and seed."""
    results = Results()
    for key, settings in plan.studies.items():
        results.cells[key] = {s.choices[0][1]: {} for s in settings}
    for o in outcomes:
        key = o.spec.run_dir.parents[2].name
        value = o.spec.setting.choices[0][1]
        results.run_dirs[(key, value, o.spec.method, o.spec.seed)] = o.spec.run_dir
        if o.summary is None:
            results.failed.append((f"[{key}] {o.spec.label}", o.error or "failed"))
            continue
        results.cells[key][value].setdefault(o.spec.method, {})[o.spec.seed] = o.summary
    return results


def write_sweep_reports(out: Path, plan: Plan, results: Results, seeds: Sequence[int]) -> None:
    """Each study's ``sweep.md``, ``sweep.json`` and plots (:mod:`raflora.experiments.report`)."""
    from raflora.experiments.report import write_sweep_report

    for key, settings in plan.studies.items():
        cells = {s.label: results.cells[key][s.choices[0][1]] for s in settings}
        failed = [(run, err) for run, err in results.failed if run.startswith(f"[{key}]")]
        axis = BY_KEY[key].axis
        write_sweep_report(
            out / key,
            cells,
            axes=[axis],
            methods=METHODS,
            seeds=seeds,
            metrics=METRICS,
            failed=failed,
        )


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Gain:
    """raFLoRA − FlexLoRA at one setting, paired over seeds (``None`` parts when missing)."""

    flex: Any  # SeedStats | None
    ra: Any  # SeedStats | None
    diff: Any  # PairedStats | None


def gain(results: Results, study: str, value: str, metric: str = ACC) -> Gain:
    """Both methods' statistics and their paired difference at one setting."""
    from raflora.experiments.stats import describe, paired

    flex = results.values(study, value, BASELINE, metric)
    ra = results.values(study, value, METHOD, metric)
    common = set(flex) & set(ra)
    return Gain(
        describe(list(flex.values())) if flex else None,
        describe(list(ra.values())) if ra else None,
        paired(ra, flex) if common else None,
    )


def gain_per_seed(results: Results, study: str, value: str, metric: str = ACC) -> dict[int, float]:
    """Seed → raFLoRA − FlexLoRA at one setting."""
    flex = results.values(study, value, BASELINE, metric)
    ra = results.values(study, value, METHOD, metric)
    return {s: ra[s] - flex[s] for s in sorted(set(flex) & set(ra))}


def compare_seeds(a: Mapping[int, float], b: Mapping[int, float]) -> Any:
    """``a − b`` paired over the seeds both have (``None`` without any)."""
    from raflora.experiments.stats import paired

    return paired(a, b) if set(a) & set(b) else None


def _scale(metric: str) -> tuple[float, str]:
    return (100.0, " pp") if "accuracy" in metric else (1.0, "")


def fmt_stats(stats: Any, metric: str = ACC) -> str:
    """``84.1 ± 1.2`` (accuracy in %), ``—`` when missing."""
    if stats is None:
        return "—"
    k, _ = _scale(metric)
    digits = 1 if k == 100.0 else 3
    if stats.std is None:
        return f"{k * stats.mean:.{digits}f}"
    return f"{k * stats.mean:.{digits}f} ± {k * stats.std:.{digits}f}"


def fmt_diff(diff: Any, metric: str = ACC) -> str:
    """``+1.3 pp [−0.5, +3.1] (2/0/1)``: mean, 95 % CI and wins/ties/losses of a paired stat."""
    if diff is None:
        return "—"
    k, unit = _scale(metric)
    digits = 1 if k == 100.0 else 3
    s = diff.stats
    text = f"{k * s.mean:+.{digits}f}{unit}"
    if s.ci_low is not None:
        text += f" [{k * s.ci_low:+.{digits}f}, {k * s.ci_high:+.{digits}f}]"
    return f"{text} ({diff.wins}/{diff.ties}/{diff.losses})"


def sign_of(diff: Any) -> str:
    """``"positive"`` / ``"negative"`` when the 95 % CI excludes 0, else ``"unclear"``."""
    if diff is None or diff.stats.ci_low is None:
        return "unclear"
    if diff.stats.ci_low > 0:
        return "positive"
    if diff.stats.ci_high < 0:
        return "negative"
    return "unclear"


# --------------------------------------------------------------------------- the claims


@dataclass(frozen=True)
class Claim:
    """One of the paper's qualitative claims and what our measurement says about it."""

    text: str
    figure: str
    verdict: str
    evidence: list[str]


def _present(results: Results, study: str) -> list[str]:
    """The study's setting values with results for both methods, in grid order."""
    cells = results.cells.get(study, {})
    return [v for v, by_m in cells.items() if by_m.get(BASELINE) and by_m.get(METHOD)]


def claim_energy(results: Results) -> Claim:
    """ "raFLoRA keeps higher-rank energy" (Figure 2a–b, 6): final HRE, paired, every setting."""
    rows: list[str] = []
    signs: list[str] = []
    diffs: list[Any] = []  # SeedStats of the paired differences
    for study in STUDIES:
        for value in _present(results, study.key):
            g = gain(results, study.key, value, HRE)
            signs.append(sign_of(g.diff))
            if g.diff is not None:
                diffs.append(g.diff.stats)
            rows.append(
                f"{study.figure} {value}: FlexLoRA {fmt_stats(g.flex, HRE)}, raFLoRA "
                f"{fmt_stats(g.ra, HRE)}, difference {fmt_diff(g.diff, HRE)}"
            )
    higher = sum(s == "positive" for s in signs)
    lower = sum(s == "negative" for s in signs)
    if not signs:
        verdict = "not measured"
    elif not any(d.ci_low is not None for d in diffs):
        ahead = sum(d.mean > 0 for d in diffs)
        verdict = (
            f"not decided (one seed: no confidence interval); raFLoRA higher in {ahead} of "
            f"{len(diffs)} settings"
        )
    elif higher == len(signs):
        verdict = (
            f"supported: raFLoRA's final higher-rank energy is higher in all {higher} settings"
        )
    elif lower == 0:
        verdict = (
            f"mostly supported: higher in {higher} of {len(signs)} settings, the others unclear "
            "(95 % CI of the paired difference includes 0)"
        )
    else:
        verdict = f"mixed: higher in {higher}, lower in {lower} of {len(signs)} settings"
    return Claim("raFLoRA keeps higher-rank energy", "2a–b, 6", verdict, rows)


def _verdict_of_trend(diff: Any, grows: str, shrinks: str, what: str = "the difference") -> str:
    sign = sign_of(diff)
    if sign == "positive":
        return f"supported: {grows}"
    if sign == "negative":
        return f"contradicted: {shrinks}"
    if diff is not None and diff.stats.ci_low is None:
        return "not decided (one seed: no confidence interval)"
    return f"not supported here: {what} is {fmt_diff(diff)}, its 95 % CI includes 0"


def claim_heterogeneity(results: Results) -> Claim:
    """ "FlexLoRA degrades more as heterogeneity grows" (Figure 7a): drop from the least to the
    most heterogeneous partition, per method, and the change of the gain, paired over seeds.
    """
    values = _present(results, "non-iid")
    if len(values) < 2:
        return Claim("FlexLoRA degrades more as heterogeneity grows", "7a", "not measured", [])
    low, high = values[0], values[-1]
    rows = []
    drops = []
    for method in METHODS:
        drop = compare_seeds(
            results.values("non-iid", low, method, ACC),
            results.values("non-iid", high, method, ACC),
        )
        drops.append(f"{NAMES[method]} {fmt_stats(drop.stats if drop else None)} pp")
        rows.append(f"{NAMES[method]} accuracy drop {low} → {high}: {fmt_diff(drop)}")
    change = compare_seeds(
        gain_per_seed(results, "non-iid", high), gain_per_seed(results, "non-iid", low)
    )
    rows.append(
        f"FlexLoRA's extra drop (= raFLoRA's gain at {high} − its gain at {low}): "
        f"{fmt_diff(change)}"
    )
    for value in values:
        rows.append(f"gain at {value}: {fmt_diff(gain(results, 'non-iid', value).diff)}")
    verdict = _verdict_of_trend(
        change,
        f"FlexLoRA loses {fmt_diff(change)} more accuracy",
        f"raFLoRA loses more accuracy ({fmt_diff(change)})",
        "FlexLoRA's extra drop",
    )
    verdict += f" (accuracy drop {low} → {high}: {', '.join(drops)})"
    return Claim("FlexLoRA degrades more as heterogeneity grows", "7a", verdict, rows)


def claim_rank_gap(results: Results) -> Claim:
    """ "raFLoRA's gain grows with the rank gap" (Figure 9a): gain at conf-8 − gain at conf-6."""
    values = _present(results, "rank-gaps")
    if len(values) < 2:
        return Claim("raFLoRA's gain grows with the rank gap", "9a", "not measured", [])
    rows = [f"gain at {v}: {fmt_diff(gain(results, 'rank-gaps', v).diff)}" for v in values]
    change = compare_seeds(
        gain_per_seed(results, "rank-gaps", values[-1]),
        gain_per_seed(results, "rank-gaps", values[0]),
    )
    rows.append(f"gain at {values[-1]} − gain at {values[0]}: {fmt_diff(change)}")
    conf = _present(results, "rank-configurations")
    rows += [
        f"(7c) gain at {v}: {fmt_diff(gain(results, 'rank-configurations', v).diff)}" for v in conf
    ]
    verdict = _verdict_of_trend(
        change,
        f"the gain is larger at {values[-1]} than at {values[0]} by {fmt_diff(change)}",
        f"the gain shrinks at the largest gap ({fmt_diff(change)})",
        f"the gain at {values[-1]} − the gain at {values[0]}",
    )
    return Claim("raFLoRA's gain grows with the rank gap", "9a (and 7c)", verdict, rows)


def claim_low_rank_skew(results: Results) -> Claim:
    """ "Under low-rank-skewed ranks the two are comparable" (Figure 7d, dist-2)."""
    values = _present(results, "rank-distributions")
    skewed = "dist-2"
    if skewed not in values:
        return Claim("under low-rank-skewed ranks the two are comparable", "7d", "not measured", [])
    rows = [f"gain at {v}: {fmt_diff(gain(results, 'rank-distributions', v).diff)}" for v in values]
    at_skew = gain(results, "rank-distributions", skewed).diff
    others = [v for v in values if v != skewed]
    other_signs = [sign_of(gain(results, "rank-distributions", v).diff) for v in others]
    sign = sign_of(at_skew)
    if at_skew is None or at_skew.stats.ci_low is None:
        verdict = "not decided (one seed: no confidence interval)"
    elif sign == "unclear" and "positive" in other_signs:
        verdict = (
            f"supported: at dist-2 raFLoRA − FlexLoRA is {fmt_diff(at_skew)}, its 95 % CI "
            "includes 0, while raFLoRA is clearly ahead under another distribution"
        )
    elif sign == "unclear":
        verdict = (
            "trivially consistent: comparable at dist-2, but raFLoRA is not clearly ahead under "
            "any distribution either, so there is no diminished advantage to see"
        )
    else:
        verdict = f"not supported: the difference at dist-2 is clearly {sign}"
    return Claim("under low-rank-skewed ranks the two are comparable", "7d", verdict, rows)


def claim_participation(results: Results) -> Claim:
    """ "Raising participation does not necessarily help raFLoRA" (Figure 7b)."""
    values = _present(results, "participation")
    if len(values) < 2:
        return Claim(
            "raising participation does not necessarily help raFLoRA", "7b", "not measured", []
        )
    rows = [
        f"raFLoRA at {v} clients/round: "
        f"{fmt_stats(gain(results, 'participation', v).ra)}; gain over FlexLoRA "
        f"{fmt_diff(gain(results, 'participation', v).diff)}"
        for v in values
    ]
    diffs = []
    for lo, hi in itertools.pairwise(values):
        step = compare_seeds(
            results.values("participation", hi, METHOD, ACC),
            results.values("participation", lo, METHOD, ACC),
        )
        diffs.append(step)
        rows.append(f"raFLoRA {hi} − {lo} clients/round: {fmt_diff(step)}")
    steps = [sign_of(d) for d in diffs]
    if any(d is None or d.stats.ci_low is None for d in diffs):
        verdict = "not decided (one seed: no confidence interval)"
    elif all(s == "positive" for s in steps):
        verdict = "not supported: every increase of participation raises raFLoRA's accuracy"
    elif any(s == "negative" for s in steps):
        verdict = "supported: a higher participation rate lowers raFLoRA's accuracy"
    else:
        unclear = f"{steps.count('unclear')} of {len(steps)} steps"
        if all(d.stats.mean > 0 for d in diffs):
            verdict = (
                "inconclusive: raFLoRA's mean accuracy rises with participation (no fall as in "
                f"the paper), but {unclear} are not significant (95 % CI includes 0), so a "
                "benefit is not shown either"
            )
        else:
            verdict = (
                "weakly supported: raFLoRA's mean accuracy falls at a higher participation "
                f"rate, though {unclear} are not significant (95 % CI includes 0)"
            )
    return Claim("raising participation does not necessarily help raFLoRA", "7b", verdict, rows)


def claim_energy_vs_heterogeneity(results: Results) -> Claim:
    """ "Increased data heterogeneity leads to poorer preservation of higher-rank energy"
    (Figure 6): raFLoRA's final HRE at the most heterogeneous partition minus at the least.
    """
    text = "more data heterogeneity keeps less higher-rank energy"
    values = _present(results, "non-iid")
    if len(values) < 2:
        return Claim(text, "6", "not measured", [])
    low, high = values[0], values[-1]
    rows = []
    change = None
    for method in (METHOD, BASELINE):
        diff = compare_seeds(
            results.values("non-iid", high, method, HRE),
            results.values("non-iid", low, method, HRE),
        )
        change = diff if method == METHOD else change
        rows.append(f"{NAMES[method]} final HRE at {high} − at {low}: {fmt_diff(diff, HRE)}")
    # the claim is that the energy falls: a significant rise contradicts it
    sign = sign_of(change)
    if sign == "negative":
        verdict = f"supported: raFLoRA's final HRE falls by {fmt_diff(change, HRE)}"
    elif sign == "positive":
        verdict = (
            f"contradicted: raFLoRA keeps more higher-rank energy under heterogeneity "
            f"({fmt_diff(change, HRE)})"
        )
        flex = [gain(results, "non-iid", v, HRE).flex for v in values]
        if all(f is not None and f.mean < 0.01 for f in flex):
            verdict += "; FlexLoRA's is below 0.01 at every level"
    else:
        verdict = _verdict_of_trend(change, "", "", "raFLoRA's change of final HRE")
    return Claim(text, "6", verdict, rows)


def claim_minimal_rank(results: Results) -> Claim:
    """ "FlexLoRA is sensitive to the minimal rank, raFLoRA avoids it" (Figures 2d, 7c):
    accuracy at conf-3 (minimal rank 8) minus at conf-1 (minimal rank 1), per method.
    """
    text = "FlexLoRA is sensitive to the minimal rank, raFLoRA is not"
    values = _present(results, "rank-configurations")
    if "conf-1" not in values or "conf-3" not in values:
        return Claim(text, "2d, 7c", "not measured", [])
    rows = []
    drops = {}
    for method in METHODS:
        drops[method] = compare_seeds(
            results.values("rank-configurations", "conf-3", method, ACC),
            results.values("rank-configurations", "conf-1", method, ACC),
        )
        rows.append(
            f"{NAMES[method]} accuracy conf-3 (r1 = 8) − conf-1 (r1 = 1): {fmt_diff(drops[method])}"
        )
    flex, ra = sign_of(drops[BASELINE]), sign_of(drops[METHOD])
    if drops[BASELINE] is None or drops[BASELINE].stats.ci_low is None:
        verdict = "not decided (one seed: no confidence interval)"
    elif flex == "positive" and ra == "unclear":
        verdict = (
            f"supported: FlexLoRA loses {fmt_diff(drops[BASELINE])} when r1 drops from 8 to 1, "
            "raFLoRA no significant change"
        )
    else:
        verdict = f"not supported: FlexLoRA {flex}, raFLoRA {ra} change from r1 = 1 to 8"
    return Claim(text, "2d, 7c", verdict, rows)


def all_claims(results: Results) -> list[Claim]:
    """The five claims of the brief, then two more the same figures make."""
    return [
        claim_energy(results),
        claim_heterogeneity(results),
        claim_rank_gap(results),
        claim_low_rank_skew(results),
        claim_participation(results),
        claim_energy_vs_heterogeneity(results),
        claim_minimal_rank(results),
    ]


# --------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {BASELINE: "tab:orange", METHOD: "tab:blue"}
NAMES = {BASELINE: "FlexLoRA", METHOD: "raFLoRA"}


def tick_label(results: Results, study: Study, value: str) -> str:
    """An x tick: the participation rate, ``α``, or a preset's name and rank levels."""
    if study.axis == "fl.clients_per_round":
        return f"{value}/50\n({100 * int(value) // 50} %)"
    if study.axis == "data.partition":
        return "IID" if value == "iid" else "α=" + value.removeprefix("dir-a")
    return preset_label(value)


def preset_label(name: str) -> str:
    """A rank preset's name and levels, or its probabilities when they are not uniform."""
    import yaml

    from raflora.experiments.sweep import resolve_preset

    fl = yaml.safe_load(resolve_preset(name).read_text(encoding="utf-8"))["fl"]
    probs = fl.get("rank_probs")
    if probs and len(set(probs)) > 1:  # the levels are the panel's; the probabilities differ
        return f"{name}\np = {'/'.join(f'{p:g}'.removeprefix('0') for p in probs)}"
    return f"{name}\n{{{','.join(map(str, fl['rank_levels']))}}}"


def bar_panel(ax: Any, results: Results, study: Study, metric: str = ACC) -> None:
    """Grouped bars (mean ± std over seeds) of both methods at each setting of a study."""
    values = list(results.cells.get(study.key, {}))
    k, _ = _scale(metric)
    width = 0.38
    for i, method in enumerate(METHODS):
        means, stds = [], []
        for value in values:
            vals = list(results.values(study.key, value, method, metric).values())
            mean = sum(vals) / len(vals) if vals else math.nan
            std = (
                math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                if len(vals) > 1
                else 0.0
            )
            means.append(k * mean)
            stds.append(k * std)
        xs = [j + (i - 0.5) * width for j in range(len(values))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, color=COLORS[method], label=NAMES[method])
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels([tick_label(results, study, v) for v in values], fontsize=7)
    finite = [
        k * v
        for value in values
        for m in METHODS
        for v in results.values(study.key, value, m, metric).values()
    ]
    if finite:
        span = max(finite) - min(finite)
        ax.set_ylim(max(0.0, min(finite) - span - 2.0), max(finite) + 0.3 * span + 5.0)
    ax.set_title(f"({study.figure}) {study.title}", fontsize=9)
    ax.set_ylabel("final accuracy (%)" if metric == ACC else metric)
    ax.grid(axis="y", alpha=0.3)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def figure7(results: Results, path: Path) -> Path:
    """Figure 7a–d: accuracy of both methods against each study's setting."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, key in zip(
        axes.flat,
        ("non-iid", "participation", "rank-configurations", "rank-distributions"),
        strict=True,
    ):
        bar_panel(ax, results, BY_KEY[key])
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Figure 7 on digits: FlexLoRA vs raFLoRA (mean ± std over seeds)", fontsize=10)
    return _save(fig, path)


def figure9a(results: Results, path: Path) -> Path:
    """Figure 9a: accuracy at growing rank gaps, with the mean gain written over each pair."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    study = BY_KEY["rank-gaps"]
    bar_panel(ax, results, study)
    for j, value in enumerate(results.cells.get(study.key, {})):
        g = gain(results, study.key, value)
        if g.diff is None or g.flex is None or g.ra is None:
            continue
        top = max(s.mean + (s.std or 0.0) for s in (g.flex, g.ra))
        text = f"{100 * g.diff.stats.mean:+.1f} pp"
        ax.annotate(
            text, (j, 100 * top), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8
        )
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def mean_series(run_dirs: Sequence[Path], key: str) -> tuple[list[int], list[Any]]:
    """Per round, the mean over runs of ``key`` in ``metrics.jsonl`` (a float or a share dict)."""
    from raflora.report import energy_shares, read_metrics

    per_round: dict[int, list[Any]] = {}
    for run_dir in run_dirs:
        for row in read_metrics(run_dir / "metrics.jsonl"):
            value = energy_shares(row) if key == "shares" else row.get(key)
            if value is not None and value != {}:
                per_round.setdefault(int(row["round"]), []).append(value)
    rounds = sorted(per_round)
    means: list[Any] = []
    for r in rounds:
        vals = per_round[r]
        if key == "shares":
            means.append({lvl: sum(v.get(lvl, 0.0) for v in vals) / len(vals) for lvl in vals[0]})
        else:
            means.append(sum(vals) / len(vals))
    return rounds, means


def _dirs(results: Results, study: str, value: str, method: str) -> list[Path]:
    return [
        d
        for (s, v, m, _), d in sorted(results.run_dirs.items(), key=lambda kv: kv[0][3])
        if (s, v, m) == (study, value, method) and (d / "metrics.jsonl").is_file()
    ]


def figure2(results: Results, path: Path) -> Path | None:
    """Figure 2a–b: share of the global update's energy per rank partition over rounds (dist-1,
    mean over seeds), FlexLoRA and raFLoRA side by side.
    """
    from raflora.report import partition_labels

    plt = _pyplot()
    value = "dist-1"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    drawn = False
    for ax, method in zip(axes, METHODS, strict=True):
        rounds, shares = mean_series(_dirs(results, "rank-distributions", value, method), "shares")
        if not rounds:
            continue
        levels = list(shares[0])
        stacks = [[s.get(lvl, 0.0) for s in shares] for lvl in levels]
        labels = partition_labels([int(lvl) for lvl in levels])
        ax.stackplot(rounds, stacks, labels=labels, alpha=0.85)
        ax.set_title(f"{NAMES[method]}: energy of the global update by rank partition", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set_ylabel("share of energy")
    axes[1].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def figure6(results: Results, path: Path) -> Path | None:
    """Figure 6: higher-rank energy over rounds for each partition (solid raFLoRA, dashed
    FlexLoRA, mean over seeds).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("viridis")
    values = list(results.cells.get("non-iid", {}))
    drawn = False
    for j, value in enumerate(values):
        color = cmap(j / max(1, len(values) - 1))
        for method, style in ((METHOD, "-"), (BASELINE, "--")):
            rounds, hre = mean_series(
                _dirs(results, "non-iid", value, method), "higher_rank_energy"
            )
            if rounds:
                label = f"{NAMES[method]} {tick_label(results, BY_KEY['non-iid'], value)}"
                ax.plot(rounds, hre, style, color=color, label=label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel("higher-rank energy 1 − ρ_r1")
    ax.set_title("Figure 6 on digits: higher-rank energy vs data heterogeneity", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- the document


def _study_table(results: Results, study: Study) -> list[str]:
    lines = [
        "| Setting | FlexLoRA acc. (%) | raFLoRA acc. (%) | raFLoRA − FlexLoRA [95 % CI] (w/t/l) "
        "| HRE FlexLoRA | HRE raFLoRA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for value in results.cells.get(study.key, {}):
        g = gain(results, study.key, value)
        h = gain(results, study.key, value, HRE)
        label = tick_label(results, study, value).replace("\n", " ")
        lines.append(
            f"| {label} | {fmt_stats(g.flex)} | {fmt_stats(g.ra)} | {fmt_diff(g.diff)} "
            f"| {fmt_stats(h.flex, HRE)} | {fmt_stats(h.ra, HRE)} |"
        )
    return lines


def _rel(path: Path, docs: Path) -> str:
    return Path(os.path.relpath(path, docs)).as_posix()


def _grid_lines(quick: bool, seeds: Sequence[int]) -> list[str]:
    rounds = QUICK_ROUNDS if quick else ROUNDS
    every = QUICK_EVAL_EVERY if quick else EVAL_EVERY
    lines = [
        f"Base: `configs/quickstart.yaml` (digits, 50 clients, 10 per round, `dir-a0.5`, lr 5e-3, "
        f"batch 16, one local epoch), {rounds} rounds, evaluated every {every} rounds; methods "
        f"FlexLoRA and raFLoRA; seeds {', '.join(map(str, seeds))} (for a given seed both methods "
        "see the same partition, client ranks and sampling). Ranks `{8, 16, 32, 48, 64}` "
        "uniformly (`dist-1`) unless the study varies them. Every run uses one torch thread.",
        "",
        "| Figure | Study (`--out` subdirectory) | Grid | Extra |",
        "|---|---|---|---|",
    ]
    for study in STUDIES:
        extra = ", ".join(f"`{o}`" for o in study.overrides) or "—"
        lines.append(
            f"| {study.figure} | {study.title} (`{study.key}`) | `{study.grid(quick)}` | {extra} |"
        )
    return lines


def write_doc(
    docs: Path,
    out: Path,
    results: Results,
    timing: Mapping[str, Any],
    *,
    quick: bool,
    seeds: Sequence[int],
) -> Path:
    """Write the figures under ``docs/figures`` and ``docs/reproduction.md``."""
    figs = docs / "figures"
    paths = {
        "2": figure2(results, figs / "fig2_energy_breakdown.png"),
        "6": figure6(results, figs / "fig6_higher_rank_energy.png"),
    }
    fig7 = figure7(results, figs / "fig7_accuracy.png")
    fig9a = figure9a(results, figs / "fig9a_rank_gaps.png")
    claims = all_claims(results)
    runs = len(results.run_dirs)
    lines = ["# Reproducing the paper's figures offline (digits)", ""]
    if quick:
        lines += [
            "> **Quick smoke run** (`--quick`: one seed, few rounds, two values per axis). The "
            "numbers below only show that the pipeline works; they are not the reproduction.",
            "",
        ]
    lines += [
        "Command: `.venv/bin/python benchmarks/paper_figures.py"
        + (" --quick" if quick else "")
        + f" --out {out.as_posix()} --docs {docs.as_posix()}` (rerunning it skips finished runs).",
        "",
        f"**Measured run time**: {timing_text(timing)}.",
        "",
        f"**Grid** ({runs} runs, {len(results.failed)} failed):",
        "",
        *_grid_lines(quick, seeds),
        "",
        "The digits task is a 2-layer ViT on 8×8 images, far from the paper's ViT/RoBERTa/LLaMA "
        "models and datasets: what can be reproduced is the *shape* of each figure (which "
        "method is ahead, how the gap moves), not its numbers. Statistics: mean ± sample std "
        "over seeds; differences are raFLoRA − FlexLoRA paired by seed, with their Student-t "
        "95 % confidence interval (`raflora.experiments.stats`) and wins/ties/losses over "
        "the seeds. Accuracy is the final evaluation's (round "
        f"{QUICK_ROUNDS if quick else ROUNDS}); HRE is the final higher-rank energy "
        "`1 − ρ_r1` of the global update (averaged over the adapted layers).",
        "",
        "## The paper's claims, measured",
        "",
        "| Claim | Figure | Our measurement |",
        "|---|---|---|",
    ]
    lines += [f"| {c.text} | {c.figure} | {c.verdict} |" for c in claims]
    for c in claims:
        lines += ["", f"### {c.text} ({c.figure})", "", f"**{c.verdict}.**", ""]
        lines += [f"- {row}" for row in c.evidence]
    lines += ["", "## Figures", ""]
    if paths["2"] is not None:
        lines += [
            "### Figure 2a–b: energy breakdown (dist-1, ranks {8, 16, 32, 48, 64})",
            "",
            f"![Figure 2]({_rel(paths['2'], docs)})",
            "",
            "Figure 2c (accuracy vs α) is Figure 7a below; Figure 2d (the minimal rank varies) "
            "is conf-1…3 of Figure 7c.",
            "",
        ]
    if paths["6"] is not None:
        lines += [
            "### Figure 6: higher-rank energy vs data heterogeneity",
            "",
            f"![Figure 6]({_rel(paths['6'], docs)})",
            "",
        ]
    lines += ["### Figure 7a–d", "", f"![Figure 7]({_rel(fig7, docs)})", ""]
    for key in ("non-iid", "participation", "rank-configurations", "rank-distributions"):
        study = BY_KEY[key]
        lines += [f"#### {study.figure}: {study.title}", "", *_study_table(results, study), ""]
    study = BY_KEY["rank-gaps"]
    lines += [
        f"### Figure 9a: {study.title}",
        "",
        f"![Figure 9a]({_rel(fig9a, docs)})",
        "",
        *_study_table(results, study),
        "",
        "## Where the runs are",
        "",
        f"Each study is a sweep under `{out.as_posix()}/<study>/` with its own `sweep.md`, "
        "`sweep.json` and plots; each run directory holds its `metrics.jsonl`, `energy.jsonl`, "
        "`summary.json` and plots.",
    ]
    if results.failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {run}: {err}" for run, err in results.failed]
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / "reproduction.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- timing


TIMING_FILE = "timing.json"


def record_timing(
    out: Path, outcomes: Sequence[RunOutcome], wall: float, jobs: int
) -> dict[str, Any]:
    """Append this invocation to ``out/timing.json`` and return the whole record."""
    path = out / TIMING_FILE
    record: dict[str, Any] = (
        json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"invocations": []}
    )
    counts = {
        s: sum(o.status == s for o in outcomes) for s in ("ran", "resumed", "skipped", "failed")
    }
    record["invocations"].append(
        {
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": round(wall, 1),
            "jobs": jobs,
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            **counts,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def timing_text(record: Mapping[str, Any]) -> str:
    """The wall time of the invocations that ran something, in words."""
    working = [i for i in record["invocations"] if i["ran"] or i["resumed"]]
    if not working:
        return "no run was run by this script (all were finished already)"
    wall = sum(i["wall_seconds"] for i in working)
    last = working[-1]
    parts = f"{len(working)} invocations" if len(working) > 1 else "one invocation"
    return (
        f"{wall / 60:.1f} min wall ({parts}, `--jobs {last['jobs']}`, {last['cpus']} CPU cores, "
        f"finished {last['finished']})"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=None, help="runs (default runs/paper-figures)")
    p.add_argument("--docs", type=Path, default=Path("docs"), help="where reproduction.md goes")
    p.add_argument("--quick", action="store_true", help="1 seed, few rounds, 2 values per axis")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (default 2)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path("runs/paper-figures-quick" if args.quick else "runs/paper-figures")
    if args.jobs < 1:
        p.error(f"--jobs must be ≥ 1, got {args.jobs}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) every study, then write the sweep reports, the figures and the doc."""
    from raflora.cli.sweep import progress_printer
    from raflora.experiments.sweep import run_plan

    args = parse_args(argv)
    # transformers' deprecation warnings would repeat once per run in every worker process
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    seeds = SEEDS[:1] if args.quick else SEEDS
    try:
        plan = build_plan(args.out, quick=args.quick, seeds=seeds)
    except SweepError as err:
        print(f"paper_figures: {err}", file=sys.stderr)
        return 2
    print(
        f"paper_figures: {len(plan.specs)} runs under {args.out} (--jobs {args.jobs})", flush=True
    )
    started = time.perf_counter()
    try:
        outcomes = run_plan(
            plan.specs, jobs=args.jobs, on_done=progress_printer(len(plan.specs), quiet=False)
        )
    except KeyboardInterrupt:
        print("paper_figures: stopped; run the same command to continue", file=sys.stderr)
        return 130
    timing = record_timing(args.out, outcomes, time.perf_counter() - started, args.jobs)
    results = collect(plan, outcomes)
    write_sweep_reports(args.out, plan, results, seeds)
    doc = write_doc(args.docs, args.out, results, timing, quick=args.quick, seeds=seeds)
    print(f"paper_figures: {doc} ({timing_text(timing)})")
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main())
