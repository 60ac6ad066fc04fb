"""Paper claims checked on a grid's results: the claims table of the report, computed, never written by
hand.

Techniques register their papers' claims (``condcomp.registry.register_claim``); a grid binds one to two
of its variants:

    claims:
      - {claim: moe.expert_choice_steps, variant: expert-choice, baseline: moe-top2}

and ``evaluate_claims`` turns each into a row: the statement, the paper's figure, the measured figure
and a verdict, "held", "did not hold" or "within noise" (the seed-to-seed 95% interval straddles the
claim's threshold). With one seed there is no interval: the verdict says "(one seed)".

The tests:
- ``lower_loss``: the variant's final validation bits/byte is below the baseline's. The difference
  and its interval come from ``stats.verdict``, paired by seed when both ran the same seeds.
- ``steps_to_loss``: the step at which the variant's validation curve first reaches the baseline's
  final value (linear between evaluations), divided by the baseline's step count, per seed. Held when
  the ratio's interval is at or below the claim's ratio. A curve that never gets there counts as not
  reaching it within its budget (did not hold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from condcomp import registry
from condcomp.compare.stats import estimate, verdict
from condcomp.config import ConfigError

HELD, NOT_HELD, NOISE = "held", "did not hold", "within noise"


@dataclass(frozen=True)
class ClaimRow:
    """One line of the claims table."""

    claim: str  # the registered id
    statement: str  # with the variant names filled in
    paper: str
    measured: str
    verdict: str
    view: str


def parse_claims(raw, grid, path: Path) -> list[dict]:
    """The grid's ``claims:`` list, checked: registered ids, variants of this grid, a view it trains."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: claims must be a list of {{claim, variant, baseline}}, got {type(raw).__name__}")
    known = registry.claims()
    views = [kind for kind, _ in grid.budgets]
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"claim", "variant", "baseline"}:
            raise ConfigError(f"{path}: claims[{i}] must be {{claim: ID, variant: NAME, baseline: NAME}}, got {entry!r}")
        if entry["claim"] not in known:
            raise ConfigError(f"{path}: claims[{i}]: unknown claim {entry['claim']!r}; registered: "
                              f"{', '.join(sorted(known))}")
        for role in ("variant", "baseline"):
            if entry[role] not in grid.variants:
                raise ConfigError(f"{path}: claims[{i}].{role}: {entry[role]!r} is not a variant of this grid; "
                                  f"variants: {', '.join(grid.variants)}")
        view = known[entry["claim"]].view
        if view not in views:
            raise ConfigError(f"{path}: claims[{i}]: {entry['claim']} compares at equal {view}, but the grid's budget "
                              f"has {', '.join(views)}; add {view}: N to budget")
        out.append(dict(entry))
    return out


def _view_of(result, grid) -> str:
    return result.view or grid.budget_kind


def _by_seed(results, grid, name: str, view: str) -> dict:
    return {r.seed: r for r in results if r.name == name and _view_of(r, grid) == view}


def steps_to_reach(curve: list[dict], target: float) -> float | None:
    """The (interpolated) step at which a validation curve first reaches ``target`` or below; None if
    it never does. curve: eval records with "step" and "val_bpb", in order."""
    prev = None
    for point in curve:
        if point["val_bpb"] <= target:
            if prev is None or prev["val_bpb"] == point["val_bpb"]:
                return float(point["step"])
            frac = (prev["val_bpb"] - target) / (prev["val_bpb"] - point["val_bpb"])
            return prev["step"] + frac * (point["step"] - prev["step"])
        prev = point
    return None


def _lower_loss(mine: dict, theirs: dict) -> tuple[str, str]:
    paired = set(mine) == set(theirs) and None not in mine
    keys = sorted(mine) if paired else None
    a = [mine[k].val_bpb for k in keys] if paired else [r.val_bpb for r in mine.values()]
    b = [theirs[k].val_bpb for k in keys] if paired else [r.val_bpb for r in theirs.values()]
    d = verdict(a, b, paired=paired)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if d.verdict == "one seed":
        return f"{d.delta:+.4f} bits/byte ({ma:.4f} vs {mb:.4f})", (HELD if d.delta <= 0 else NOT_HELD) + " (one seed)"
    measured = f"{d.delta:+.4f} ± {d.half_width:.4f} bits/byte ({ma:.4f} vs {mb:.4f}, {len(a)} seeds)"
    return measured, {"better": HELD, "worse": NOT_HELD}.get(d.verdict, NOISE)


def _steps_to_loss(mine: dict, theirs: dict, ratio: float) -> tuple[str, str]:
    ratios = []
    for seed, base in theirs.items():
        if seed not in mine:
            continue
        reached = steps_to_reach(mine[seed].curve, base.curve[-1]["val_bpb"])
        ratios.append(math.inf if reached is None else reached / base.curve[-1]["step"])
    if not ratios:
        return "no seed in common", NOT_HELD
    if any(math.isinf(r) for r in ratios):
        missed = sum(math.isinf(r) for r in ratios)
        reached = ", ".join(f"{r:.2f}x" for r in ratios if not math.isinf(r))
        return (f"did not reach the baseline's final loss within its budget in {missed} of {len(ratios)} seed(s)"
                + (f"; the others at {reached} the steps" if reached else "") + f" (claim: <= {ratio:g}x)",
                NOT_HELD + (" (one seed)" if len(ratios) == 1 else ""))
    est = estimate(ratios)
    if est.n == 1:
        return f"{est.mean:.2f}x the steps (claim: <= {ratio:g}x)", (HELD if est.mean <= ratio else NOT_HELD) + " (one seed)"
    measured = f"{est.mean:.2f}x ± {est.half_width:.2f} the steps ({est.n} seeds; claim: <= {ratio:g}x)"
    if est.mean + est.half_width <= ratio:
        return measured, HELD
    if est.mean - est.half_width > ratio:
        return measured, NOT_HELD
    return measured, NOISE


def evaluate_claims(grid, results) -> list[ClaimRow]:
    """The claims table of a grid from its results (rows in the grid's order)."""
    known = registry.claims()
    rows = []
    for entry in grid.claims:
        claim = known[entry["claim"]]
        mine = _by_seed(results, grid, entry["variant"], claim.view)
        theirs = _by_seed(results, grid, entry["baseline"], claim.view)
        statement = claim.statement.format(variant=entry["variant"], baseline=entry["baseline"])
        if not mine or not theirs:
            measured, outcome = "not run yet", "n/a"
        elif claim.test == "lower_loss":
            measured, outcome = _lower_loss(mine, theirs)
        else:
            measured, outcome = _steps_to_loss(mine, theirs, claim.ratio)
        rows.append(ClaimRow(claim.id, statement, claim.paper, measured, outcome, claim.view))
    return rows


def claims_markdown(rows: list[ClaimRow]) -> str:
    out = ["| claim | paper's figure | measured here | verdict |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.statement} (equal {r.view}) | {r.paper} | {r.measured} | **{r.verdict}** |")
    return "\n".join(out)
