"""Benchmark outputs people read: a markdown table, a bar chart PNG and a self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image, ImageDraw

from smpo_cli.utils.atomic import atomic_path, write_text


def _fmt(entry: dict | None, pct: bool = False) -> str:
    if not entry or entry.get("mean" if not pct else "win_rate") is None:
        return "-"
    value = entry["win_rate"] if pct else entry["mean"]
    lo, hi = entry["ci95"]
    return f"{value:.2f}% [{lo:.1f}, {hi:.1f}]" if pct else f"{value:.4g} [{lo:.4g}, {hi:.4g}]"


TINY_REWARD = "a tiny model with random weights, built in-process: it checks the machinery; its scores and win rates say nothing about the images"


def shapes_pickscore_description() -> str:
    """What shapes-pickscore is, with the held-out vote accuracies its training measured (from the shipped folder)."""
    import json

    from smpo_cli.models.shipped import SHIPPED_REWARDS

    what = ("the shapes world's PickScore (a CLIP model trained with PickScore's loss on simulated annotators' "
            "votes, `smpo shapes reward`)")  # fmt: skip
    meta = SHIPPED_REWARDS["shapes-pickscore"][1] / "smpo_reward.json"
    if meta.is_file():
        acc = json.loads(meta.read_text(encoding="utf-8")).get("heldout_vote_accuracy", {})
        if acc:
            what += (f"; it predicts {100 * acc['reward']:.0f}% of held-out votes, the shapes judge "
                     f"{100 * acc['judge']:.0f}%, the population's own preference {100 * acc['population']:.0f}%")  # fmt: skip
    return what


def reward_notes(recipe) -> list[str]:
    """What each reward model is: a win rate is only as meaningful as the reward that produced it."""
    notes = []
    for reward in recipe.rewards:
        if reward.path == "tiny":
            what = TINY_REWARD
        elif reward.path == "shapes-pickscore":
            what = shapes_pickscore_description()
        elif reward.path is None:
            what = "the official weights"
        else:
            what = f"weights from `{reward.path}`"
        notes.append(f"Reward `{reward.name}`: {what}.")
    return notes


def write_markdown(result, recipe) -> str:
    has_base = recipe.baseline is not None
    head = "| reward (units) | model | " + ("baseline | model win rate vs baseline |" if has_base else "")
    sep = "| --- | --- | " + ("--- | --- |" if has_base else "")
    rows = [f"# smpo bench: {recipe.model.pretrained}" + (f" vs {recipe.baseline.pretrained}" if has_base else ""), "",
            f"{result.prompts} prompts x {recipe.sampling.images_per_prompt} images from `{recipe.prompts.path}`; "
            "means with 95% intervals; win rates in percent (ties count half).", "", head, sep]  # fmt: skip
    for name, m in result.metrics.items():
        cells = [f"{name} ({m['units']})", _fmt(m.get("model"))]
        if has_base:
            cells += [_fmt(m.get("baseline")), _fmt(m.get("win_rate_vs_baseline"), pct=True)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows + [""] + reward_notes(recipe)) + "\n"


def write_chart(result, dest: Path) -> None:
    """Win rates (or, without a baseline, the model's means normalised per reward) as horizontal bars."""
    names = list(result.metrics)
    width, row, left = 640, 36, 160
    img = Image.new("RGB", (width, 40 + row * max(1, len(names))), "white")
    d = ImageDraw.Draw(img)
    with_base = any("win_rate_vs_baseline" in m for m in result.metrics.values())
    d.text((10, 10), "model win rate vs baseline (%)" if with_base else "model mean score", fill="black")
    for i, name in enumerate(names):
        m = result.metrics[name]
        y = 40 + i * row
        frac = (m["win_rate_vs_baseline"]["win_rate"] / 100) if with_base else 0.5
        label = f"{m['win_rate_vs_baseline']['win_rate']:.1f}%" if with_base else f"{m['model']['mean']:.3g}"
        d.text((10, y + 8), name, fill="black")
        d.rectangle((left, y + 4, left + int(frac * (width - left - 80)), y + row - 8), fill=(70, 110, 200))
        if with_base:
            mid = left + (width - left - 80) // 2
            d.line((mid, y, mid, y + row - 4), fill=(200, 60, 60))
        d.text((width - 70, y + 8), label, fill="black")
    with atomic_path(dest, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def image_data_uri(img: Image.Image, fmt: str = "PNG") -> str:
    """``img`` embedded in a self-contained page."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _thumb(path: Path, size: int = 192) -> str:
    img = Image.open(path).convert("RGB")
    img.thumbnail((size, size))
    return image_data_uri(img)


def write_report(result, recipe, sides: dict, prompts, dest: Path) -> None:
    from smpo_cli.generation.runner import image_path

    table = [line for line in write_markdown(result, recipe).splitlines()[4:] if line.startswith("|")]
    rows_html = []
    for i, line in enumerate(table):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if i == 1:
            continue
        tag = "th" if i == 0 else "td"
        rows_html.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
    grid = []
    for rec in prompts[: recipe.report_samples]:
        cells = []
        for side, gen in sides.items():
            imgs = "".join(f'<img src="{_thumb(image_path(gen, rec.index, k))}" alt="{side} {k}">'
                           for k in range(recipe.sampling.images_per_prompt))  # fmt: skip
            cells.append(f'<div class="side"><div class="label">{side}</div>{imgs}</div>')
        grid.append(f'<div class="prompt"><p>{rec.index}: {html.escape(rec.prompt)}</p>{"".join(cells)}</div>')
    chart = _thumb(dest.parent / "chart.png", size=640)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>smpo bench</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
.prompt{{margin:1em 0;border-top:1px solid #ddd}}.side{{display:inline-block;margin-right:2em;vertical-align:top}}
.label{{font-weight:bold}}img{{margin:2px}}</style></head><body>
<h1>smpo bench: {html.escape(recipe.model.pretrained)}{" vs " + html.escape(recipe.baseline.pretrained) if recipe.baseline else ""}</h1>
<p>{result.prompts} prompts from {html.escape(recipe.prompts.path)}, {recipe.sampling.images_per_prompt} image(s) each, same seed per
(prompt, sample) for both models. Means with 95% intervals; win rates in percent, ties count half.</p>
<table>{"".join(rows_html)}</table>{"".join(f"<p>{html.escape(n.replace('`', ''))}</p>" for n in reward_notes(recipe))}<p><img src="{chart}" alt="chart"></p><h2>Samples</h2>{"".join(grid)}</body></html>
"""
    write_text(dest, page)
