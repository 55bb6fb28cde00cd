"""Plant known mutants in a copy of the package and check that the suite catches each.

Each mutant is a one-line change that keeps the code running but makes it wrong in a way
an earlier version of the tests could not see (SAE feature order, the linearisation point
of attribution patching, Gram–Schmidt against only the previous vector, the sign of
steering, ...). For each: copy the repository to a temporary folder, apply the change,
run the named tests there, and expect at least one failure. Exit status 1 if any mutant
survives or a pattern no longer matches the source (update the table when code moves).

    python scripts/mutation_check.py            # all mutants
    python scripts/mutation_check.py sae_cosine_index_order
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the root


MUTANTS = [
    Mutant(
        "dashboard_contexts_swapped",
        "melbo_lens/analysis/sae/dashboard_finish.py",
        "windows_top = windows_of(stream, sc.top_locations, left, right)",
        "windows_top = windows_of(stream, sc.top_locations.roll(1, 0), left, right)",
        ("tests/analysis/test_dashboards.py",),
    ),
    Mutant(
        "logit_effects_without_final_norm",
        "melbo_lens/analysis/sae/dashboard_finish.py",
        "        d = d * w",
        "        d = d",
        ("tests/analysis/test_dashboards.py",),
    ),
    Mutant(
        "logit_effects_sign",
        "melbo_lens/analysis/sae/dashboard_finish.py",
        "eff = logit_effects(model, dirs[cols]).cpu()",
        "eff = -logit_effects(model, dirs[cols]).cpu()",
        ("tests/analysis/test_dashboards.py",),
    ),
    Mutant(
        "card_promoted_sign",
        "melbo_lens/analysis/cards.py",
        "up, down = torch.topk(dp, k).indices, torch.topk(-dp, k).indices",
        "down, up = torch.topk(dp, k).indices, torch.topk(-dp, k).indices",
        ("tests/analysis/test_cards.py",),
    ),
    Mutant(
        "sae_cosine_index_order",
        "melbo_lens/analysis/sae/decompose.py",
        "chosen = torch.topk(score, k).indices",
        "chosen = torch.topk(score, k).indices.sort().values",
        ("tests/analysis/test_sae.py",),
    ),
    Mutant(
        "sae_sparse_not_reordered",
        "melbo_lens/analysis/sae/decompose.py",
        "order = torch.argsort(weights.abs(), descending=True, stable=True)",
        "order = torch.arange(len(weights))",
        ("tests/analysis/test_sae.py",),
    ),
    Mutant(
        "atp_linearised_at_clean",
        "melbo_lens/analysis/attribution/estimators.py",
        "hooks = [*state.perturb, *((g.hook, tap(g)) for g in groups)]",
        "hooks = [*((g.hook, tap(g)) for g in groups)]",
        ("tests/analysis/test_attribution.py",),
    ),
    Mutant(
        "gram_schmidt_previous_only",
        "melbo_lens/methods/constraints.py",
        "coeff = torch.tril(coeff, diagonal=-1)  # keep j < k",
        "coeff = torch.tril(coeff, diagonal=-1) - torch.tril(coeff, diagonal=-2)",
        ("tests/methods/test_melbo.py",),
    ),
    Mutant(
        "steering_sign",
        "melbo_lens/perturbations/vectors.py",
        "v = vectors.to(device=act.device, dtype=act.dtype) * scale",
        "v = -vectors.to(device=act.device, dtype=act.dtype) * scale",
        ("tests/test_generation.py",),
    ),
    Mutant(
        "objective_q_ignored",
        "melbo_lens/methods/objectives.py",
        "return total if q == 1.0 else total.pow(1.0 / q)",
        "return total",
        ("tests/methods/test_objectives.py",),
    ),
    Mutant(
        "tangent_projection_dropped",
        "melbo_lens/methods/constraints.py",
        "return grad - (grad * unit).sum(-1, keepdim=True) * unit",
        "return grad",
        ("tests/methods/test_constraints.py",),
    ),
    Mutant(
        "adapter_scale_dropped",
        "melbo_lens/perturbations/adapters.py",
        "delta = (coeff @ b_.transpose(-1, -2)) * scale",
        "delta = coeff @ b_.transpose(-1, -2)",
        ("tests/methods/test_adapters.py",),
    ),
    Mutant(
        "outlier_two_token_midpoint",
        "melbo_lens/core/outliers.py",
        "median = real.min() if real.numel() == 2 else real.quantile(0.5)",
        "median = real.quantile(0.5)",
        ("tests/test_nothing_silent_2.py::test_09_the_sink_of_a_two_token_prompt_is_found",),
    ),
    Mutant(
        "outlier_lower_median_everywhere",
        "melbo_lens/core/outliers.py",
        "median = real.min() if real.numel() == 2 else real.quantile(0.5)",
        "median = real.median()",
        ("tests/test_nothing_silent_2.py::test_09_the_sink_of_a_two_token_prompt_is_found",),
    ),
    Mutant(
        "sweep_cell_id_ignores_prompt_text",
        "melbo_lens/workflows/sweep_grid.py",
        '"prompts": self.prompts[prompt_set],',
        '"prompts": len(self.prompts[prompt_set]),',
        ("tests/test_nothing_silent_2.py::test_08_grid_values_are_checked_strictly",),
    ),
    Mutant(
        "sparse_topk_ties_latest_first",
        "melbo_lens/analysis/streaming.py",
        "by_value = torch.argsort(-vals, stable=True)  # ties keep token order",
        "by_value = (len(vals) - 1) - torch.argsort(-vals.flip(0), stable=True)",
        ("tests/analysis/test_dashboards.py", "tests/workflows/test_dashboards_sharded.py"),
    ),
    Mutant(
        "window_records_candidate_0",
        "melbo_lens/methods/training/phase.py",
        "kept = [int(torch.argmax(obj))] if self.window else slice(None)",
        "kept = [0] if self.window else slice(None)",
        ("tests/methods/test_window.py::test_recorded_step_objective_is_the_best_candidates",),
    ),
    Mutant(
        "window_collapsed_never_restart",
        "melbo_lens/methods/training/window.py",
        "rows = [best] + [j for j in range(len(self.ids)) if j != best and bool(collapsed[j])]",
        "rows = [best]",
        ("tests/methods/test_window.py::test_restart_rule_counts_exactly",),
    ),
    Mutant(
        "window_accepted_row_kept_warm",
        "melbo_lens/methods/training/window.py",
        "rows = [best] + [j for j in range(len(self.ids)) if j != best and bool(collapsed[j])]",
        "rows = [j for j in range(len(self.ids)) if j != best and bool(collapsed[j])]",
        ("tests/methods/test_window.py::test_restart_rule_counts_exactly",),
    ),
    Mutant(
        "radius_walk_stops_above_lowest_octave",
        "melbo_lens/methods/radius.py",
        "while k > 0 and not measure(grid[k - 1]):",
        "while k > 1 and not measure(grid[k - 1]):",
        ("tests/methods/test_defaults.py",),
    ),
    Mutant(
        "refill_keeps_adam_history",
        "melbo_lens/methods/training/solvers.py",
        "state[key][rows] = 0.0",
        "state[key][rows] = state[key][rows]",
        ("tests/methods/test_window.py::test_solver_state_after_a_slot_is_accepted",),
    ),
    Mutant(
        "refill_momentum_not_projected",
        "melbo_lens/methods/training/solvers.py",
        "momentum[name].copy_(cleaned[name])",
        "momentum[name].copy_(momentum[name])",
        ("tests/methods/test_window.py::test_solver_state_after_a_slot_is_accepted",),
    ),
    Mutant(
        "refill_power_objective_kept",
        "melbo_lens/methods/training/solvers.py",
        "self.accepted_obj.fill_(-math.inf)",
        "self.accepted_obj.fill_(self.accepted_obj.max())",
        ("tests/methods/test_window.py::test_solver_state_after_a_slot_is_accepted",),
    ),
    Mutant(
        "plateau_tolerance_loose",
        "melbo_lens/methods/training/spec.py",
        "return bool(best[-1] - best[-1 - span] <= tol * best[-1].abs())",
        "return bool(best[-1] - best[-1 - span] <= 10 * tol * best[-1].abs())",
        ("tests/methods/test_window.py::test_plateau_rule_at_its_boundary",),
    ),
    Mutant(
        "plateau_reads_last_point_not_best",
        "melbo_lens/methods/training/spec.py",
        "best = torch.cummax(curve.double(), 0).values",
        "best = curve.double()",
        ("tests/methods/test_window.py::test_plateau_rule_at_its_boundary",),
    ),
    Mutant(
        "plateau_not_checked_on_resume",
        "melbo_lens/methods/training/phase.py",
        "            self.bar.update(n_steps - first)\n            return\n",
        "            pass\n",
        ("tests/methods/test_window.py::test_an_early_stopped_run_resumes_bit_exactly",),
    ),
]


def run(mutant: Mutant) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(
            ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__")
        )
        target = copy / mutant.path
        if not target.is_file():
            return "STALE", f"{mutant.path} does not exist"
        text = target.read_text()
        if text.count(mutant.old) != 1:
            return "STALE", f"pattern found {text.count(mutant.old)} times in {mutant.path}"
        target.write_text(text.replace(mutant.old, mutant.new))
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests]
        proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        if proc.returncode == 1:  # tests ran and at least one failed
            return "KILLED", tail[0]
        return "SURVIVED", f"pytest exit {proc.returncode}: {tail[0]}"


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    bad = 0
    for mutant in chosen:
        verdict, detail = run(mutant)
        bad += verdict != "KILLED"
        print(f"{verdict:8s} {mutant.name:28s} {detail}", flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
