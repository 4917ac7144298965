"""Evaluate a standalone draft against its target on Spec-Bench style prompts: tau, alpha by position, speedup."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from draftkit.data.sources import DataError, DataFileNotFoundError
from draftkit.runtime.speculative import (
    Drafter,
    GenerationStats,
    LMDrafter,
    Verifier,
    autoregressive_generate,
    speculative_generate,
)
from draftkit.runtime.predict import (
    best_point,
    dynamic_tree_curve,
    forward_seconds,
    prediction,
    step_costs,
    tree_size_curve,
)
from draftkit.runtime.tree import DynamicTree, StaticTree, TopKTree, TreeDrafter, describe_shape, tree_generate
from draftkit.targets.hf import Target

# Enough to initialise kernels and allocator pools; a full-length warm-up would only add minutes on CPU.
_WARMUP_NEW_TOKENS = 16


def load_prompts(
    path: str | Path, limit_per_category: int | None = None, categories: Iterable[str] | None = None
) -> list[dict]:
    """Read Spec-Bench records (`{"question_id", "category", "turns": [str, ...]}`, one JSON object per line).

    Keeps file order; `categories` selects (and must name existing categories), `limit_per_category` keeps the first N of each.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"prompt file not found: {path}. Fix: check the path, or leave --prompts out for "
                                    "the prompts bundled with draftkit")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg}). Fix: one JSON object per "
                                "line") from None
            turns = record.get("turns") if isinstance(record, dict) else None
            if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
                raise DataError(
                    f"{path}:{line_number}: expected an object with a non-empty list of strings under \"turns\". "
                    'Fix: write Spec-Bench records: {"question_id": ..., "category": ..., "turns": ["..."]}'
                )
            record.setdefault("question_id", line_number)
            record.setdefault("category", "default")
            records.append(record)
    if categories is not None:
        wanted = list(categories)
        available = sorted({r["category"] for r in records})
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise DataError(f"{path}: no prompts in categories {unknown}. Fix: choose from {available}")
        records = [r for r in records if r["category"] in wanted]
    if limit_per_category is not None:
        kept: dict[str, int] = defaultdict(int)
        limited = []
        for record in records:
            if kept[record["category"]] < limit_per_category:
                kept[record["category"]] += 1
                limited.append(record)
        records = limited
    return records


def encode_prompt(tokenizer, text: str, device: torch.device) -> torch.Tensor:
    """The prompt as the target expects it in chat use: [1, T] ids, chat template with the generation prompt if any."""
    if getattr(tokenizer, "chat_template", None):
        formatted = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        # The template already holds every special token; letting the tokenizer add a BOS would double it.
        ids = tokenizer(formatted, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids.to(device)


def eos_token_ids(target: Target) -> list[int]:
    """Union of the tokenizer's EOS and the generation config's (chat models often stop on several ids)."""
    ids = set()
    candidates = [target.tokenizer.eos_token_id, getattr(target.model.generation_config, "eos_token_id", None)]
    for candidate in candidates:
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate is not None:
            ids.update(int(i) for i in candidate)
    return sorted(ids)


# The interval every report states for tau and alpha: a percentile interval over resamples of the prompts.
BOOTSTRAP = {"method": "per-prompt bootstrap, percentile interval", "level": 0.95, "resamples": 1000}


def _resample_rows(count: int, seed: int, resamples: int) -> torch.Tensor:
    """[resamples, count] row indices drawn with replacement by Python's own seeded generator (the same draw anywhere)."""
    rng = random.Random(seed)
    return torch.tensor([rng.choices(range(count), k=count) for _ in range(resamples)])


def _percentile_interval(values: torch.Tensor, level: float) -> list[float]:
    tail = (1.0 - level) / 2
    return torch.quantile(values, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()


def bootstrap_ratios(numerators: list[list[float]], denominators: list[list[float]], *, seed: int = 0,
                     resamples: int = BOOTSTRAP["resamples"], level: float = BOOTSTRAP["level"]
                     ) -> list[list[float] | None]:
    """Percentile intervals of pooled ratios sum(numerator) / sum(denominator), one per column, resampling the rows
    (prompts) with replacement: rows[i][j] is prompt i's count for ratio j (tau: new tokens over target forwards; alpha
    at position j: accepted over reached). Pooling whole prompts keeps each prompt's steps together, so the interval
    reflects how much tau varies between prompts, not just between steps. A resample whose denominator is 0 (a position
    none of its prompts reached) does not count for that ratio; fewer than two prompts, or a ratio no resample defines,
    give None. The resamples are drawn by Python's own seeded generator, so a table gives the same interval anywhere."""
    count = len(numerators)
    columns = len(numerators[0]) if count else 0
    if count < 2:
        return [None] * columns
    picked = _resample_rows(count, seed, resamples)  # [resamples, prompts]
    top = torch.tensor(numerators, dtype=torch.float64)[picked].sum(dim=1)  # [resamples, columns]
    bottom = torch.tensor(denominators, dtype=torch.float64)[picked].sum(dim=1)
    intervals: list[list[float] | None] = []
    for column in range(columns):
        defined = bottom[:, column] > 0
        ratios = top[defined, column] / bottom[defined, column]
        intervals.append(_percentile_interval(ratios, level) if ratios.numel() else None)
    return intervals


def bootstrap_ratio_difference(first: list[tuple[float, float]], second: list[tuple[float, float]], *, seed: int = 0,
                               resamples: int = BOOTSTRAP["resamples"], level: float = BOOTSTRAP["level"]
                               ) -> list[float] | None:
    """Percentile interval of sum(n1)/sum(d1) - sum(n2)/sum(d2), where first[i] and second[i] are (numerator,
    denominator) of the same prompt i measured two ways (two drafts on the same prompts), resampling the prompts
    together: the variation between prompts that both share cancels, as a paired comparison should. None with fewer
    than two prompts."""
    if len(first) != len(second):
        raise ValueError(f"paired rows differ in number: {len(first)} vs {len(second)}")
    if len(first) < 2:
        return None
    picked = _resample_rows(len(first), seed, resamples)
    a = torch.tensor(first, dtype=torch.float64)[picked].sum(dim=1)  # [resamples, 2]
    b = torch.tensor(second, dtype=torch.float64)[picked].sum(dim=1)
    return _percentile_interval(a[:, 0] / a[:, 1] - b[:, 0] / b[:, 1], level)


def _intervals(rows: list[dict], gamma: int, seed: int) -> tuple[list[float] | None, list[list[float] | None]]:
    """The bootstrap interval of tau and of alpha at each position, pooled per prompt the way _summarize pools."""
    numerators = [[r["new_tokens"]] + [r["accepted_per_position"][i] for i in range(gamma)] for r in rows]
    denominators = [[r["target_forwards"]] + [r["proposed_per_position"][i] for i in range(gamma)] for r in rows]
    intervals = bootstrap_ratios(numerators, denominators, seed=seed)
    return intervals[0], intervals[1:]


def _summarize(rows: list[dict], gamma: int, measure_speedup: bool, greedy: bool, profile: bool = False,
               chain: bool = True, static_tree: StaticTree | None = None, seed: int = 0) -> dict:
    """Pool per-prompt counters (Spec-Bench pools accepted lengths over all steps, and tokens/s over all time), with
    bootstrap intervals over the prompts for tau and alpha (BOOTSTRAP, seeded with `seed`)."""
    new_tokens = sum(r["new_tokens"] for r in rows)
    target_forwards = sum(r["target_forwards"] for r in rows)
    drafted = sum(r["drafted_tokens"] for r in rows)
    proposed = [sum(r["proposed_per_position"][i] for r in rows) for i in range(gamma)]
    accepted = [sum(r["accepted_per_position"][i] for r in rows) for i in range(gamma)]
    time_s = sum(r["time_s"] for r in rows)
    tau_ci, alpha_ci = _intervals(rows, gamma, seed)
    summary = {
        "prompts": len(rows),
        "new_tokens": new_tokens,
        "target_forwards": target_forwards,
        "draft_forwards": sum(r["draft_forwards"] for r in rows),
        "drafted_tokens": drafted,
        "accepted_draft_tokens": sum(accepted),
        "tau": new_tokens / target_forwards if target_forwards else None,
        "tau_ci": tau_ci,
        "alpha": [a / p if p else None for a, p in zip(accepted, proposed)],
        "alpha_ci": alpha_ci,
        "draft_acceptance": sum(accepted) / drafted if drafted else None,
        "time_s": time_s,
        "tokens_per_s": new_tokens / time_s if time_s else None,
    }
    if measure_speedup:
        ar_tokens = sum(r["ar_new_tokens"] for r in rows)
        ar_time = sum(r["ar_time_s"] for r in rows)
        ar_rate = ar_tokens / ar_time if ar_time else None
        summary.update(
            ar_new_tokens=ar_tokens,
            ar_time_s=ar_time,
            ar_tokens_per_s=ar_rate,
            speedup=summary["tokens_per_s"] / ar_rate if ar_rate and summary["tokens_per_s"] else None,
            # Sampled outputs differ from an independent AR sample by design, so the count only means something greedy.
            outputs_differing_from_ar=sum(not r["matches_ar"] for r in rows) if greedy else None,
        )
    if profile:
        summary.update(draft_time_s=sum(r["draft_time_s"] for r in rows),
                       verify_time_s=sum(r["verify_time_s"] for r in rows))
        if measure_speedup and summary["speedup"] is not None:
            summary["prediction"] = prediction(summary, chain=chain)
    if static_tree is not None and greedy:
        counts = [sum(r["accepted_nodes"][i] for r in rows if i < len(r["accepted_nodes"]))
                  for i in range(static_tree.size)]
        steps = target_forwards - len(rows)  # each prompt's first forward (the prefill) verifies no tree
        summary["tree_nodes"] = {"paths": [list(p) for p in static_tree.paths],
                                 "accept_rate": [c / steps if steps else 0.0 for c in counts]}
    ranked = [r["accepted_by_rank"] for r in rows if r.get("accepted_by_rank")]
    if ranked and greedy:
        depth = max(len(r) for r in ranked)
        width = max((len(row) for r in ranked for row in r), default=0)
        summary["tree_ranks"] = {
            "steps": target_forwards - len(rows),  # each prompt's first forward (the prefill) verifies no tree
            "accepted_by_rank": [[sum(r[d][i] for r in ranked if d < len(r) and i < len(r[d])) for i in range(width)]
                                 for d in range(depth)]}
    return summary


def _tree_size_prediction(summary: dict, target: Target, prompt_ids: torch.Tensor) -> dict:
    """The best subtree of every size of the evaluated static tree, priced with this run's step costs: verification
    scaled from the measured full-tree cost by how a forward's time grows with its token count on this device."""
    nodes = summary["tree_nodes"]
    size = len(nodes["paths"])
    sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s < size} | {size})
    seconds = forward_seconds(target.model, prompt_ids, [s + 1 for s in sizes])  # + the newest committed token
    costs = step_costs(summary)
    tree_steps = summary["target_forwards"] - summary["prompts"]
    draft_ratio = summary["draft_time_s"] / max(tree_steps, 1) / costs.ar_step_s
    full = seconds[size + 1]
    curve = tree_size_curve(nodes["paths"], nodes["accept_rate"],
                            lambda n: costs.verify_ratio * seconds[n + 1] / full, draft_ratio, sizes)
    best = max(curve, key=lambda point: (point["predicted_speedup"], -point["size"]))
    return {"draft_ratio_per_step": draft_ratio, "curve": curve, "recommended_tree_size": best["size"],
            "recommended_tree_paths": best["paths"], "predicted_speedup_at_recommended": best["predicted_speedup"]}


# total_tokens the predictor prices below a measured dynamic tree.
_TREE_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 60, 64, 80, 96, 128, 192, 256)


def _dynamic_tree_prediction(summary: dict, target: Target, prompt_ids: torch.Tensor, shape) -> dict:
    """The best (depth, total_tokens) of the measured confidence-grown tree's growth (runtime.predict.dynamic_tree_curve),
    priced with this run's step costs: verification scaled from the measured cost by how a forward's time grows with
    its token count on this device, drafting at the measured cost per draft pass times the depth."""
    measured = shape.total_tokens if isinstance(shape, DynamicTree) else shape.budget
    sizes = sorted({s for s in _TREE_SIZES if s < measured} | {measured})
    seconds = forward_seconds(target.model, prompt_ids, [s + 1 for s in sizes])  # + the newest committed token
    costs = step_costs(summary)
    full = seconds[measured + 1]
    ranks = summary["tree_ranks"]
    curve = dynamic_tree_curve(ranks["accepted_by_rank"], ranks["steps"], range(1, shape.depth + 1), sizes,
                               lambda n: costs.verify_ratio * seconds[n + 1] / full,
                               lambda depth: costs.cost_ratio * depth)
    best = best_point(curve)
    return {"dynamic_tree_curve": curve, "recommended_depth": best["depth"],
            "recommended_total_tokens": best["total_tokens"], "predicted_tau_at_recommended": best["tau"],
            "predicted_speedup_at_recommended": best["predicted_speedup"]}


def _stats_row(stats: GenerationStats) -> dict:
    return {
        "new_tokens": stats.new_tokens,
        "target_forwards": stats.target_forwards,
        "draft_forwards": stats.draft_forwards,
        "drafted_tokens": stats.drafted_tokens,
        "proposed_per_position": stats.proposed_per_position,
        "accepted_per_position": stats.accepted_per_position,
        "tau": stats.tau,
        "time_s": stats.wall_time_s,
        "draft_time_s": stats.draft_time_s,
        "verify_time_s": stats.verify_time_s,
        "accepted_nodes": stats.accepted_nodes,
        "accepted_by_rank": stats.accepted_by_rank,
    }


def draft_name(draft) -> str:
    config = getattr(draft, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(draft, "name", "") or type(draft).__name__


def draft_dtype(draft) -> str | None:
    module = draft if isinstance(draft, nn.Module) else getattr(draft, "model", None)
    if not isinstance(module, nn.Module):
        return None
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def _autoregressive(target: Target, ids: torch.Tensor, *, temperature: float, max_new_tokens: int, seed: int):
    return autoregressive_generate(target.model, ids, temperature=temperature, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_ids(target),
                                   generator=torch.Generator(device=target.device).manual_seed(seed))


def autoregressive_baseline(target: Target, prompts: list[dict], *, temperature: float = 0.0,
                            max_new_tokens: int = 128, seed: int = 0, progress: bool = True) -> dict:
    """Plain decoding of `target` on each prompt's first turn, measured once so that a sweep over many draft settings
    (evaluate_draft(..., baseline=this)) compares every setting with the same run instead of decoding it again each
    time. Returns {"settings", "prompts": [{"question_id", "tokens", "new_tokens", "time_s"}]}."""
    encoded = [encode_prompt(target.tokenizer, record["turns"][0], target.device) for record in prompts]
    settings = {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
                "question_ids": [record["question_id"] for record in prompts]}
    _autoregressive(target, encoded[0], temperature=temperature, max_new_tokens=min(max_new_tokens, _WARMUP_NEW_TOKENS),
                    seed=seed)
    rows = []
    for index, ids in enumerate(tqdm(encoded, desc="autoregressive baseline", disable=not progress)):
        output = _autoregressive(target, ids, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + index)
        rows.append({"question_id": prompts[index]["question_id"], "tokens": output.tokens,
                     "new_tokens": output.stats.new_tokens, "time_s": output.stats.wall_time_s})
    return {"settings": settings, "prompts": rows}


def evaluate_draft(
    target: Target,
    draft: nn.Module | Drafter | TreeDrafter,
    prompts: list[dict],
    *,
    gamma: int = 5,
    temperature: float = 0.0,
    acceptance: str = "greedy",
    max_new_tokens: int = 128,
    measure_speedup: bool = True,
    seed: int = 0,
    progress: bool = True,
    verifier: Verifier | None = None,
    profile: bool = False,
    baseline: dict | None = None,
) -> dict:
    """Speculative decoding of `target` with `draft` (a draft LM, or any Drafter) on the first turn of each Spec-Bench record.

    Returns {"config", "overall", "categories": {name: summary}, "prompts": [per-prompt rows]}; a summary holds tau,
    alpha per draft position, draft-token acceptance, token and call counts, tokens/s and, with measure_speedup, the
    AR baseline's tokens/s on the same prompts, speedup and (greedy only) how many outputs differ from AR.
    A TreeDrafter (runtime/tree.py) decodes with tree verification (`acceptance` picks greedy or Medusa's lossy
    typical acceptance); its alpha is per tree depth and `gamma` becomes its max_depth.
    `verifier` replaces whole-target verification (self-drafting families; see runtime.speculative.Verifier).
    `profile` times drafting and verification apart (one extra sync per step) and, with measure_speedup, adds
    "prediction" to each summary: the speedup runtime.predict expects from the measured tau and step costs, next
    to the measured one, and for chain drafters the recommended gamma.
    `baseline` (from autoregressive_baseline, same prompts and settings) replaces the AR decoding of measure_speedup.
    """
    if not prompts:
        raise ValueError("evaluate_draft needs at least one prompt")
    if baseline is not None:
        wanted = {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
                  "question_ids": [record["question_id"] for record in prompts]}
        if baseline["settings"] != wanted:
            raise ValueError(f"the autoregressive baseline was measured with {baseline['settings']}, not with this "
                             f"evaluation's {wanted}. Fix: measure it with the same prompts and settings")
    device = target.device
    # A bare model is a standalone draft LM; any other family passes its own Drafter.
    drafter = LMDrafter(draft) if isinstance(draft, nn.Module) else draft
    is_tree = hasattr(drafter, "propose_tree")
    if is_tree:
        gamma = drafter.max_depth
        if temperature > 0 and acceptance == "greedy":  # the lossless verification at this temperature
            acceptance = "sampling"
    # Node i of a static tree is the same path of candidate ranks at every step: its acceptance prices subtrees.
    shape = getattr(drafter, "shape", None) if is_tree else None
    static_tree = shape if isinstance(shape, StaticTree) else None
    eos = eos_token_ids(target)
    greedy = temperature == 0.0
    encoded = [encode_prompt(target.tokenizer, record["turns"][0], device) for record in prompts]

    def spec(ids: torch.Tensor, seed_offset: int, new_tokens: int):
        if is_tree:
            return tree_generate(
                target.model, drafter, ids, temperature=temperature, acceptance=acceptance, max_new_tokens=new_tokens,
                eos_token_id=eos, generator=torch.Generator(device=device).manual_seed(seed + seed_offset),
                profile=profile,
            )
        return speculative_generate(
            target.model, drafter, ids, gamma=gamma, temperature=temperature, max_new_tokens=new_tokens,
            eos_token_id=eos, generator=torch.Generator(device=device).manual_seed(seed + seed_offset),
            verifier=verifier, profile=profile,
        )

    run_baseline = measure_speedup and baseline is None
    warmup_tokens = min(max_new_tokens, _WARMUP_NEW_TOKENS)
    spec(encoded[0], 0, warmup_tokens)
    if run_baseline:
        _autoregressive(target, encoded[0], temperature=temperature, max_new_tokens=warmup_tokens, seed=seed)

    rows = []
    for index, (record, ids) in enumerate(
        tqdm(list(zip(prompts, encoded)), desc="speculative decoding", disable=not progress)
    ):
        output = spec(ids, index, max_new_tokens)
        row = {"question_id": record["question_id"], "category": record["category"], "prompt_tokens": ids.shape[1]}
        row.update(_stats_row(output.stats))
        if run_baseline:
            reference = _autoregressive(target, ids, temperature=temperature, max_new_tokens=max_new_tokens,
                                        seed=seed + index)
            row.update(ar_new_tokens=reference.stats.new_tokens, ar_time_s=reference.stats.wall_time_s,
                       matches_ar=reference.tokens == output.tokens)
        elif measure_speedup:
            reference = baseline["prompts"][index]
            row.update(ar_new_tokens=reference["new_tokens"], ar_time_s=reference["time_s"],
                       matches_ar=reference["tokens"] == output.tokens)
        rows.append(row)

    by_category: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row)
    report = {
        "config": {
            "target": target.name,
            "draft": draft_name(draft),
            "gamma": gamma,
            "temperature": temperature,
            "decoding": f"tree ({acceptance})" if is_tree else "chain",
            "tree": describe_shape(shape) if shape is not None else None,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "measure_speedup": measure_speedup,
            "device": str(device),
            "target_dtype": str(next(target.model.parameters()).dtype).removeprefix("torch."),
            "draft_dtype": draft_dtype(draft),
            "interval": {**BOOTSTRAP, "seed": seed},
        },
        "overall": _summarize(rows, gamma, measure_speedup, greedy, profile, chain=not is_tree, static_tree=static_tree,
                              seed=seed),
        "categories": {
            name: _summarize(category_rows, gamma, measure_speedup, greedy, profile, chain=not is_tree,
                             static_tree=static_tree, seed=seed)
            for name, category_rows in by_category.items()
        },
        "prompts": rows,
    }
    overall = report["overall"]
    if "prediction" in overall and "tree_nodes" in overall:
        overall["prediction"].update(_tree_size_prediction(overall, target, encoded[0]))
    if "prediction" in overall and "tree_ranks" in overall and isinstance(shape, (DynamicTree, TopKTree)):
        overall["prediction"].update(_dynamic_tree_prediction(overall, target, encoded[0], shape))
    return report


# The largest tree a --tree-budget auto calibration drafts: the predictor chooses among smaller ones.
AUTO_MAX_TOTAL_TOKENS = 128


def evaluate_dynamic_tree_auto(
    target: Target,
    make_drafter: Callable[[DynamicTree], TreeDrafter],
    prompts: list[dict],
    *,
    depth: int = 6,
    top_ks: Sequence[int] = (10,),
    max_total_tokens: int = AUTO_MAX_TOTAL_TOKENS,
    max_new_tokens: int = 128,
    seed: int = 0,
    progress: bool = True,
    profile: bool = False,
) -> dict:
    """A dynamic tree (runtime.tree.DynamicTree) whose size the predictor chooses from a measurement, then measured.

    For each top-k, a greedy calibration run drafts the largest tree (`depth`, `max_total_tokens`) with profiled step
    costs; runtime.predict.dynamic_tree_curve prices every smaller depth and total_tokens from the confidence ranks of
    the nodes it accepted, and the best predicted speedup over all of them is the choice. top-k itself changes which
    nodes are drafted, so each top-k needs its own calibration run. The chosen tree is then evaluated on the same prompts
    against the same autoregressive baseline (the calibration's own report when nothing smaller wins). The returned
    report is evaluate_draft's for the chosen tree, plus "tree_choice": every calibration's tau, interval and
    recommendation, the choice, its predicted and measured tau and speedup. The choice is made on the prompts it is
    then measured on: a small optimism, stated in the record."""
    if not top_ks:
        raise ValueError("evaluate_dynamic_tree_auto needs at least one top-k to calibrate")
    baseline = autoregressive_baseline(target, prompts, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    settings = dict(max_new_tokens=max_new_tokens, seed=seed, progress=progress, baseline=baseline)
    calibrations = []
    for top_k in top_ks:
        shape = DynamicTree(depth=depth, top_k=top_k, total_tokens=max_total_tokens)
        calibrations.append((shape, evaluate_draft(target, make_drafter(shape), prompts, profile=True, **settings)))
    best_shape, best_report = max(
        calibrations, key=lambda c: c[1]["overall"]["prediction"]["predicted_speedup_at_recommended"])
    predicted = best_report["overall"]["prediction"]
    chosen = DynamicTree(depth=predicted["recommended_depth"], top_k=best_shape.top_k,
                         total_tokens=predicted["recommended_total_tokens"])
    report = best_report if chosen == best_shape else evaluate_draft(
        target, make_drafter(chosen), prompts, profile=profile, **settings)
    overall = report["overall"]
    report["tree_choice"] = {
        "by": "runtime.predict.dynamic_tree_curve on greedy calibration runs of the largest tree per top-k, priced "
              "with their measured step costs; chosen and then measured on the same prompts",
        "calibrations": [{"tree": describe_shape(shape), "tau": r["overall"]["tau"], "tau_ci": r["overall"]["tau_ci"],
                          "speedup": r["overall"]["speedup"],
                          "recommended": {k: r["overall"]["prediction"][k] for k in (
                              "recommended_depth", "recommended_total_tokens", "predicted_tau_at_recommended",
                              "predicted_speedup_at_recommended")},
                          "curve": r["overall"]["prediction"]["dynamic_tree_curve"]} for shape, r in calibrations],
        "chosen": describe_shape(chosen),
        "predicted_tau": predicted["predicted_tau_at_recommended"],
        "predicted_speedup": predicted["predicted_speedup_at_recommended"],
        "measured_tau": overall["tau"],
        "measured_speedup": overall["speedup"],
    }
    return report


def _cell(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def tree_summary(tree: dict) -> str:
    """A recorded tree (runtime.tree.describe_shape) in a few words."""
    settings = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in tree.items() if k not in ("kind", "paths"))
    return f"{tree['kind']} tree ({settings})"


def interval_cell(interval: list[float] | None, digits: int = 2) -> str:
    """"[low, high]", or "–" where no interval exists (one prompt, or a report made before intervals were kept)."""
    return "–" if not interval else f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def interval_label(config: dict) -> str:
    """The column header of a report's tau interval, e.g. "τ 95% CI"."""
    level = (config.get("interval") or BOOTSTRAP)["level"]
    return f"{level:.0%} CI"


def interval_note(config: dict) -> str:
    """One sentence saying how the intervals were made, for a table's footnote."""
    interval = config.get("interval")
    if not interval:
        return "This report predates confidence intervals."
    return (f"{interval['level']:.0%} CI: {interval['method']} of tau over {interval['resamples']} resamples of the "
            f"prompts (seed {interval['seed']}), pooled as the table pools; it is wide when prompts are few.")


def render_markdown(report: dict) -> str:
    """One table, a row per category plus the overall row: tau, alpha@1..gamma, tok/s and (if measured) speedup."""
    config = report["config"]
    gamma = config["gamma"]
    speedup = config["measure_speedup"]
    header = (["category", "prompts", "tau", f"tau {interval_label(config)}"] + [f"alpha@{i}" for i in range(1, gamma + 1)]
              + ["tok/s"])
    if speedup:
        header += ["AR tok/s", "speedup"]
    lines = [
        f"# Draft evaluation: {config['draft']} → {config['target']}",
        "",
        f"gamma={gamma}, temperature={config['temperature']}, max_new_tokens={config['max_new_tokens']}, "
        f"device={config['device']}, target dtype={config['target_dtype']}, draft dtype={config['draft_dtype']}"
        + (f", {config['decoding']}: {tree_summary(config['tree'])}" if config.get("tree") else ""),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    named = list(report["categories"].items()) + [("**overall**", report["overall"])]
    for name, summary in named:
        cells = [name, str(summary["prompts"]), _cell(summary["tau"]), interval_cell(summary.get("tau_ci"))]
        cells += [_cell(a) for a in summary["alpha"]]
        cells.append(_cell(summary["tokens_per_s"], 1))
        if speedup:
            cells += [_cell(summary["ar_tokens_per_s"], 1), _cell(summary["speedup"], suffix="x")]
        lines.append("| " + " | ".join(cells) + " |")
    overall = report["overall"]
    lines += [
        "",
        f"tau = tokens per target forward (accepted draft tokens + 1, Spec-Bench); "
        f"draft-token acceptance {_cell(overall['draft_acceptance'])}; "
        f"{overall['new_tokens']} new tokens in {overall['target_forwards']} target forwards.",
        interval_note(config),
    ]
    predicted = overall.get("prediction")
    if predicted:
        line = (f"Cost model (runtime.predict): a draft forward costs {predicted['cost_ratio']:.3f} and a verification "
                f"{predicted['verify_ratio']:.2f} autoregressive target steps; predicted speedup "
                f"{predicted['predicted_speedup']:.2f}x, measured {_cell(predicted['measured_speedup'], suffix='x')}")
        if "recommended_gamma" in predicted:
            line += (f"; recommended gamma {predicted['recommended_gamma']} "
                     f"(predicted {predicted['predicted_speedup_at_recommended']:.2f}x)")
        if "recommended_tree_size" in predicted:
            line += (f"; best subtree of this static tree: {predicted['recommended_tree_size']} nodes "
                     f"(predicted {predicted['predicted_speedup_at_recommended']:.2f}x; paths in eval.json)")
        if "recommended_total_tokens" in predicted:
            line += (f"; best tree of this growth: depth {predicted['recommended_depth']}, "
                     f"{predicted['recommended_total_tokens']} tokens (predicted tau "
                     f"{predicted['predicted_tau_at_recommended']:.2f}, "
                     f"{predicted['predicted_speedup_at_recommended']:.2f}x)")
        lines.append(line + ".")
    choice = report.get("tree_choice")
    if choice:
        tree = choice["chosen"]
        lines.append(f"Tree chosen by the predictor (--tree-budget auto): dynamic, depth {tree['depth']}, top-k "
                     f"{tree['top_k']}, {tree['total_tokens']} tokens; predicted tau {choice['predicted_tau']:.2f} "
                     f"and {choice['predicted_speedup']:.2f}x, measured {_cell(choice['measured_tau'])} and "
                     f"{_cell(choice['measured_speedup'], suffix='x')} (calibration runs in eval.json).")
    if speedup and overall["outputs_differing_from_ar"] is not None:
        lines.append(
            f"Outputs differing from greedy AR decoding: {overall['outputs_differing_from_ar']} of {overall['prompts']} "
            "(0 expected in fp32; bf16 near-ties can flip tokens)."
        )
    return "\n".join(lines) + "\n"
