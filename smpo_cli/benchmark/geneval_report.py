"""GenEval outputs people read: the paper's table (markdown) and a page of failures with detections drawn."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from smpo_cli.benchmark.geneval_rules import TASKS
from smpo_cli.benchmark.report import image_data_uri
from smpo_cli.utils.atomic import write_text

TASK_HEADERS = {"single_object": "Single obj.", "two_object": "Two obj.", "counting": "Counting", "colors": "Colors",
                "position": "Position", "color_attr": "Color attr."}  # fmt: skip


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_markdown(result, recipe) -> str:
    what = recipe.model.pretrained if recipe.model else recipe.images
    lines = [f"# GenEval: {what}", "",
             f"{result.images} images of {result.prompts} prompts; detector: {result.detector or 'unknown'}; "
             f"colour judge: {result.colour_model}.", ""]  # fmt: skip
    if recipe.limit:
        lines += [f"**Partial run** (the first {recipe.limit} prompts): not comparable with published GenEval scores.", ""]
    lines += ["| Overall | " + " | ".join(TASK_HEADERS.values()) + " |", "| --- " * (len(TASKS) + 1) + "|",
              "| " + " | ".join([_pct(result.overall)] + [_pct(result.tasks.get(t)) for t in TASKS]) + " |", "",
              f"Accuracy in percent: per task the fraction of images judged correct; overall = the mean of the six tasks. "
              f"Images correct: {_pct(result.images_correct)}%; prompts with at least one correct image: "
              f"{_pct(result.prompts_with_a_correct_image)}%."]  # fmt: skip
    return "\n".join(lines) + "\n"


def draw_detections(path: str | Path, row: dict[str, Any], size: int = 320) -> Image.Image:
    """The image with its kept detections: classes the prompt names in green, others in grey."""
    meta = json.loads(row["metadata"])
    named = {c["class"] for c in meta.get("include", []) + meta.get("exclude", [])}
    img = Image.open(path).convert("RGB")
    scale = size / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    draw = ImageDraw.Draw(img)
    for cls, dets in json.loads(row["details"]).items():
        colour = (40, 200, 60) if cls in named else (170, 170, 170)
        for x1, y1, x2, y2, score in dets:
            box = [v * scale for v in (x1, y1, x2, y2)]
            draw.rectangle(box, outline=colour, width=2)
            draw.text((box[0] + 3, box[1] + 2), f"{cls} {score:.2f}", fill=colour)
    return img


def write_failures(rows: list[dict[str, Any]], result, recipe, dest: Path) -> None:
    sections = []
    for task in TASKS:
        failed = [r for r in rows if r["tag"] == task and not r["correct"]]
        total = sum(r["tag"] == task for r in rows)
        if not total:
            continue
        cards = []
        for r in failed[: recipe.failures_per_task]:
            uri = image_data_uri(draw_detections(r["filename"], r), "JPEG")
            cards.append(f'<figure><img src="{uri}" alt="{html.escape(r["prompt"])}"><figcaption><b>{html.escape(r["prompt"])}</b>'
                         f' (#{r["prompt_index"]}/{r["sample_index"]})<br>{html.escape(r["reason"]).replace(chr(10), "<br>")}'
                         "</figcaption></figure>")  # fmt: skip
        shown = f"showing {len(cards)} of {len(failed)}" if failed else "none"
        sections.append(f'<h2>{TASK_HEADERS[task]}: {len(failed)} of {total} images failed ({shown})</h2>'
                        f'<div class="grid">{"".join(cards)}</div>')  # fmt: skip
    title = f"GenEval failures: {html.escape(str(recipe.model.pretrained if recipe.model else recipe.images))}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}.grid{{display:flex;flex-wrap:wrap;gap:1em}}
figure{{margin:0;width:320px}}figcaption{{font-size:13px}}</style></head><body><h1>{title}</h1>
<p>Overall {_pct(result.overall)}% with detector {html.escape(result.detector or "unknown")}. Boxes: detections kept by the rules
(score above the threshold, at most {recipe.rules.max_objects} per class); green = a class the prompt names.</p>
{"".join(sections)}</body></html>
"""
    write_text(dest, page)
