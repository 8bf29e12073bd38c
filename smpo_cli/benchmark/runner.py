"""``run_benchmark(recipe)``: generate (or reuse) images of a model and a baseline, score them, report.

Images come from ``smpo generate`` into ``model_images/`` and ``baseline_images/`` with the same seed
per (prompt, sample index), so each model image has a paired baseline image; existing images are
reused. Every reward model scores every image against its prompt. Outputs: ``scores.jsonl`` (one line
per image and reward), ``results.json`` (means with 95% intervals, win rates in percent),
``results.md``, ``chart.png`` and a self-contained ``report.html`` with side-by-side samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smpo_cli.benchmark.metrics import REPORT_OUTPUT, mean_ci, win_rate
from smpo_cli.config.schema import BenchRecipe, GenerateRecipe
from smpo_cli.utils.atomic import write_json, write_text
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class BenchResult:
    output_dir: str
    prompts: int
    images_per_model: int
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _generate(recipe: BenchRecipe, which: str, model) -> GenerateRecipe:
    from smpo_cli.config import LoadedRecipe
    from smpo_cli.generation.runner import resume_ok, run_generation
    from smpo_cli.runs import execute

    data = {"stage": "generate", "seed": recipe.seed, "device": recipe.device,
            "output_dir": str(Path(recipe.output_dir) / f"{which}_images"),
            "model": model.model_dump(mode="json"), "prompts": recipe.prompts.model_dump(mode="json"),
            "sampling": recipe.sampling.model_dump(mode="json")}  # fmt: skip
    gen = GenerateRecipe.model_validate(data)
    execute("generate", LoadedRecipe(gen, f"(smpo bench: {which})"), run_generation, resume=resume_ok)
    return gen


def run_benchmark(recipe: BenchRecipe) -> BenchResult:
    from smpo_cli.generation.prompts import load_prompts
    from smpo_cli.generation.runner import image_path
    from smpo_cli.rewards import load_reward

    started = time.perf_counter()
    out = Path(recipe.output_dir)
    prompts = load_prompts(recipe.prompts.path, column=recipe.prompts.column, limit=recipe.prompts.limit)
    sides = {"model": _generate(recipe, "model", recipe.model)}
    if recipe.baseline is not None:
        sides["baseline"] = _generate(recipe, "baseline", recipe.baseline)
    n_img = recipe.sampling.images_per_prompt
    keys = [(p.index, k) for p in prompts for k in range(n_img)]
    text = {p.index: p.prompt for p in prompts}
    scores: dict[str, dict[str, list[float]]] = {}
    lines = []
    device = "cuda" if recipe.device == "auto" and _cuda() else ("cpu" if recipe.device == "auto" else recipe.device)
    # decode every image once, not once per reward model
    images = {side: [_open_rgb(image_path(gen, i, k)) for i, k in keys] for side, gen in sides.items()}
    for spec in recipe.rewards:
        path = spec.path
        if path == "tiny":
            from smpo_cli.rewards.tiny import tiny_reward_path

            path = str(tiny_reward_path(spec.name, build=True))
        reward = load_reward(spec.name, path, device=device, dtype="float32", batch_size=recipe.reward_batch_size, **spec.options)
        output, _ = REPORT_OUTPUT[spec.name]
        scores[spec.name] = {}
        for side in sides:
            values = reward.score(images[side], [text[i] for i, _ in keys])[output].tolist()
            scores[spec.name][side] = values
            lines += [{"side": side, "prompt_index": i, "sample_index": k, "reward": spec.name, "output": output,
                       "score": v} for (i, k), v in zip(keys, values, strict=True)]  # fmt: skip
    metrics: dict[str, Any] = {}
    for name, by_side in scores.items():
        entry = {"output": REPORT_OUTPUT[name][0], "units": REPORT_OUTPUT[name][1]}
        entry.update({side: mean_ci(v) for side, v in by_side.items()})
        if "baseline" in by_side:
            entry["win_rate_vs_baseline"] = win_rate(by_side["model"], by_side["baseline"])
        metrics[name] = entry
    result = BenchResult(str(out), len(prompts), len(keys), metrics, round(time.perf_counter() - started, 3))
    write_text(out / "scores.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    write_json(out / "results.json", {**result.to_dict(), "model": recipe.model.model_dump(mode="json"),
                                      "baseline": recipe.baseline.model_dump(mode="json") if recipe.baseline else None,
                                      "prompts_path": recipe.prompts.path,
                                      "sampling": recipe.sampling.model_dump(mode="json")})  # fmt: skip
    from smpo_cli.benchmark.report import write_chart, write_markdown, write_report

    write_text(out / "results.md", write_markdown(result, recipe))
    write_chart(result, out / "chart.png")
    write_report(result, recipe, sides, prompts, out / "report.html")
    return result


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
