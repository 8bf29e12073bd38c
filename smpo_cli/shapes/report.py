"""The shapes experiment's outputs people read: a markdown table with intervals, curves, a scatter, sample grids.

Charts are drawn with PIL (no plotting dependency): simple, legible, deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from smpo_cli.utils.atomic import atomic_path

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (23, 190, 207)]
SKILL_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _fmt(entry: dict[str, Any] | None, pct: bool = True) -> str:
    if not entry or entry.get("mean") is None:
        return "-"
    scale = 100.0 if pct else 1.0
    text = f"{scale * entry['mean']:.1f}" if pct else f"{entry['mean']:.3g}"
    if entry.get("ci95") is not None:
        text += f" ± {scale * entry['ci95']:.1f}" if pct else f" ± {entry['ci95']:.2g}"
    return text


def _pct(value: float | None) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.1f}%"


def _skill_rank(skill: str) -> int:
    return SKILL_ORDER.index(skill) if skill in SKILL_ORDER else len(SKILL_ORDER)


def _arm_overrides(recipe) -> str:
    """'; dpo: lr 2.5e-05' for every arm whose lr or beta differs from train's (its own tuned settings)."""
    parts = []
    for arm in recipe.arms:
        own = [f"{key} {value:g}" for key, value in (("lr", arm.lr), ("beta", arm.beta)) if value is not None]
        if own:
            parts.append(f"{arm.name}: {', '.join(own)}")
    return f" ({'; '.join(parts)})" if parts else ""


def write_markdown(result, recipe) -> str:
    base = result.base
    t = recipe.train
    lines = [
        "# Shapes testbed: SmPO vs Diffusion-DPO", "",
        f"{result.pairs} pairs from `{recipe.model}` ({result.reward_ties} with equal judge scores); "
        f"every arm: {t.steps} steps x {t.batch_size} pairs, lr {t.lr:g}, beta {t.beta:g}, gamma {t.gamma:g}, "
        f"seeds {t.seeds}{_arm_overrides(recipe)}. Means over seeds ± the 95% t-interval half-width; accuracies in percent.",
        f"Pairs: best vs worst of {recipe.pairs.images_per_caption} samples at guidance {recipe.pairs.guidance_scale:g} by "
        f"`{recipe.pairs.reward}`. Human labels name the population's preferred image in "
        f"{_pct(result.label_agreement['human_vote'])} of pairs; the reward in "
        f"{_pct(result.label_agreement.get('reward', float('nan')))}; "
        f"the judge (where its scores differ) in {_pct(result.label_agreement['judge_when_decided'])}.", "",
        "| arm | accuracy | held-out acc. | score | true pref. vs base | win rate vs base | distance | s / run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| base | {100 * base['accuracy']:.1f} | {_fmt({'mean': base['heldout_accuracy']})} | {base['score']:.3f} | 50.0 | 50.0 | 0 | - |",
    ]  # fmt: skip
    for name, m in result.arms.items():
        lines.append(f"| {name} | {_fmt(m['accuracy'])} | {_fmt(m['heldout_accuracy'])} | {_fmt(m['score'], False)} | "
                     f"{_fmt(m['true_preference_vs_base'])} | {_fmt(m['win_rate_vs_base'])} | {_fmt(m['distance'], False)} | "
                     f"{_fmt(m['seconds'], False)} |")  # fmt: skip
    skills = [s for s in SKILL_ORDER if s in base["skills"]]
    if result.pair_skills:
        lines += ["", "Pairs per skill (one correct: exactly one image of the pair is correct, what the pairs can teach; "
                  "both wrong: no headroom; `pairs.skill_weights` changes the mix):", "",
                  "| skill | pairs | one correct | both wrong | judge ties |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
        lines += [f"| {s} | {d['pairs']} | {_pct(d['one_correct'])} | {_pct(d['both_wrong'])} | {_pct(d['judge_ties'])} |"
                  for s, d in sorted(result.pair_skills.items(), key=lambda kv: _skill_rank(kv[0]))]  # fmt: skip
        lines += ["", _caption_mix(result.pair_mix)]
    lines += ["", "Per-skill accuracy (percent of images judged correct):", "",
              "| arm | " + " | ".join(skills) + " |", "| --- " * (len(skills) + 1) + "|",
              "| base | " + " | ".join(f"{100 * base['skills'][s]:.1f}" for s in skills) + " |"]  # fmt: skip
    for name, m in result.arms.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m["skills"].get(s)) for s in skills) + " |")
    if result.paired:
        ci = lambda d: f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"  # noqa: E731
        seeds = lambda d: ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"])  # noqa: E731
        lines += ["", f"GenEval-balanced changes in points, paired by seed on {result.paired['eval_images']} images per model "
                  "(each image averaged over the training seeds; 95% bootstrap interval stratified by skill):", "",
                  "| comparison | change [95% CI] | per seed |", "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {a} - base | {ci(d)} | {seeds(d)} |" for a, d in result.paired["arms"].items()]
        lines += [f"| {pair} | {ci(d)} | {seeds(d)} |" for pair, d in result.paired["comparisons"].items()]
    lines += ["", "distance: mean squared difference of the UNet's noise predictions from the base model's (a KL proxy); "
              "true pref. vs base: the annotator population's probability of preferring the model's image to the base "
              "model's image of the same seed and caption."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _axes(draw: ImageDraw.ImageDraw, box, xr, yr, title: str, xlabel: str) -> Any:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y0 - 14), title, fill=(0, 0, 0))
    draw.text((x0 + (x1 - x0) // 2 - 20, y1 + 16), xlabel, fill=(0, 0, 0))
    draw.text((x0, y1 + 4), f"{xr[0]:.3g}", fill=(0, 0, 0))
    draw.text((x1 - 40, y1 + 4), f"{xr[1]:.3g}", fill=(0, 0, 0))
    draw.text((x0 - 44, y0), f"{yr[1]:.3g}", fill=(0, 0, 0))
    draw.text((x0 - 44, y1 - 10), f"{yr[0]:.3g}", fill=(0, 0, 0))

    def to_px(x: float, y: float) -> tuple[float, float]:
        fx = (x - xr[0]) / ((xr[1] - xr[0]) or 1)
        fy = (y - yr[0]) / ((yr[1] - yr[0]) or 1)
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    return to_px


def _runs_metrics(out: Path, arm: str, seeds: list[int]) -> list[list[dict[str, Any]]]:
    runs = []
    for seed in seeds:
        path = out / "runs" / f"{arm}-s{seed}" / "metrics.jsonl"
        if path.exists():
            runs.append([json.loads(x) for x in path.read_text().splitlines() if x.strip()])
    return runs


def write_curves(out: Path, recipe, dest: Path) -> None:
    """Training loss and implicit accuracy per arm (mean over seeds, running mean over a tenth of the run)."""
    keys = [("loss", "training loss"), ("implicit_acc", "implicit accuracy")]
    img = Image.new("RGB", (900, 380), "white")
    draw = ImageDraw.Draw(img)
    for panel, (key, title) in enumerate(keys):
        series = {}
        for arm in recipe.arms:
            runs = [r for r in _runs_metrics(out, arm.name, recipe.train.seeds) if r and key in r[0]]
            if not runs:
                continue
            n = min(len(r) for r in runs)
            steps = [row["step"] for row in runs[0][:n]]
            mean = np.mean([[row[key] for row in r[:n]] for r in runs], axis=0)
            window = max(1, n // 10)  # a running mean: each logged point is one noisy batch
            smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
            series[arm.name] = (steps[window - 1 :], smooth)
        values = np.concatenate([v for _, v in series.values()]) if series else np.array([0.0, 1.0])
        xr = (0, recipe.train.steps)
        yr = (float(values.min()), float(values.max()))
        to_px = _axes(draw, (60 + panel * 440, 40, 420 + panel * 440, 320), xr, yr, title, "step")
        for i, (name, (steps, vals)) in enumerate(series.items()):
            colour = PALETTE[i % len(PALETTE)]
            draw.line([to_px(s, v) for s, v in zip(steps, vals, strict=True)], fill=colour, width=2)
            draw.text((70 + panel * 440, 50 + 14 * i), name, fill=colour)
    with atomic_path(dest, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def write_over_optimisation(result, dest: Path) -> None:
    """Judge score against distance from the base model, one dot per run."""
    img = Image.new("RGB", (520, 400), "white")
    draw = ImageDraw.Draw(img)
    runs = result.runs
    xs = [r["distance"] for r in runs] + [0.0]
    ys = [r["score"] for r in runs] + [result.base["score"]]
    to_px = _axes(draw, (70, 40, 500, 350), (0.0, max(xs) * 1.05 or 1.0), (min(ys) - 0.01, max(ys) + 0.01),
                  "judge score vs distance from the base model", "distance")  # fmt: skip
    names = list(result.arms)
    for r in runs:
        x, y = to_px(r["distance"], r["score"])
        colour = PALETTE[names.index(r["arm"]) % len(PALETTE)]
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
    x, y = to_px(0.0, result.base["score"])
    draw.rectangle((x - 4, y - 4, x + 4, y + 4), fill=(0, 0, 0))
    for i, name in enumerate(["base", *names]):
        draw.text((80, 50 + 14 * i), name, fill=(0, 0, 0) if i == 0 else PALETTE[(i - 1) % len(PALETTE)])
    with atomic_path(dest, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def write_grid(out: Path, recipe, dest: Path, scale: int = 3) -> None:
    """First samples of the first ``eval.grid_captions`` captions: one row per model (base, each arm's seed 0)."""
    captions = (out / "eval" / "captions.txt").read_text().splitlines()[: recipe.eval.grid_captions]
    rows = ["base"] + [f"{a.name}-s{recipe.train.seeds[0]}" for a in recipe.arms]
    cell, label_w, head = 32 * scale, 150, 14 * 3
    img = Image.new("RGB", (label_w + cell * len(captions), head + cell * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    for j, caption in enumerate(captions):
        words = caption.split()
        for line in range(3):
            draw.text((label_w + j * cell + 2, 2 + 13 * line), " ".join(words[line * 3 : line * 3 + 3]), fill=(0, 0, 0))
    for i, row in enumerate(rows):
        draw.text((4, head + i * cell + cell // 2 - 6), row, fill=(0, 0, 0))
        for j in range(len(captions)):
            path = out / "eval" / row / "images" / f"{j:05d}_00.png"
            if path.exists():
                tile = Image.open(path).convert("RGB").resize((cell, cell), Image.NEAREST)
                img.paste(tile, (label_w + j * cell, head + i * cell))
    with atomic_path(dest, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def _caption_mix(mix: dict) -> str:
    """One line: how the pair captions' skills were mixed."""
    weights, pilot = mix.get("weights"), mix.get("pilot")
    if not weights:
        return "Caption mix: the world's uniform mix of skills."
    shares = ", ".join(f"{s} {w:.2f}" for s, w in sorted(weights.items(), key=lambda kv: _skill_rank(kv[0])))
    if pilot is None:
        return f"Caption mix: `pairs.skill_weights` {shares}."
    return (f"Caption mix: weighted toward headroom by a pilot of {pilot['captions_per_skill']} captions per skill "
            f"(weight: the Laplace-smoothed share of best-vs-worst pairs with one correct image): {shares}.")
