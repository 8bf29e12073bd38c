"""``smpo quickstart``: the whole chain on the shipped shapes model, offline, on a CPU.

1. ``smpo generate``: two samples per caption of the shapes world from ``shapes-sd15`` (the testbed's
   base model, shipped with smpo) -> preference pairs;
2. ``smpo score``: a tiny PickScore-architecture reward labels them and gives p;
3. ``smpo invert``: the ReNoise training cache of every pair;
4. ``smpo train``: SmPO (from the cache) and Diffusion-DPO, a few steps each;
5. ``smpo bench rewards``: each trained model against the base model, with a report.

Every stage is the real one, run with the bundled tiny recipes or overrides a user could type. The
reward model is a tiny random PickScore, so win rates check the machinery; the shapes judge's accuracy
on the benchmark images says what the pictures show (the shapes testbed, ``smpo shapes run``, measures
the method).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle", "two red squares",
    "a blue circle above a red square", "a green square", "three yellow triangles",
]  # fmt: skip
MODEL = "shapes-sd15"
RESOLUTION = 32  # the shapes model's native size


@dataclass
class QuickstartResult:
    output_dir: str
    pairs: int
    scored_pairs: int
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_quickstart(output_dir: str | Path, *, steps: int = 4) -> QuickstartResult:
    from smpo_cli.benchmark.runner import run_benchmark
    from smpo_cli.config import load_recipe
    from smpo_cli.generation.runner import resume_ok as gen_resume
    from smpo_cli.generation.runner import run_generation
    from smpo_cli.inversion.runner import resume_ok as inv_resume
    from smpo_cli.inversion.runner import run_inversion
    from smpo_cli.runs import execute
    from smpo_cli.scoring.runner import run_scoring
    from smpo_cli.training.runner import run_training

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    size = [f"sampling.height={RESOLUTION}", f"sampling.width={RESOLUTION}", "sampling.num_inference_steps=20",
            "sampling.guidance_scale=4"]  # fmt: skip
    samples = root / "samples"
    gen = [f"model.pretrained={MODEL}", f"prompts.path={prompts}", f"output_dir={samples}", "sampling.images_per_prompt=2", *size]
    execute("generate", load_recipe(None, "generate", gen), run_generation, overwrite=True, resume=gen_resume)
    pairs = samples / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"image_0": f"images/{i:05d}_00.png", "image_1": f"images/{i:05d}_01.png", "prompt": p}) + "\n"
        for i, p in enumerate(PROMPTS)
    ))  # fmt: skip
    scored = root / "scored"
    score = execute("score", load_recipe("tiny_score_cpu", "score", [f"data.path={pairs}", f"output_dir={scored}"]),
                    run_scoring, overwrite=True)  # fmt: skip
    cache = root / "cache"
    inv = [f"data.path={scored}", f"output_dir={cache}", f"model.pretrained={MODEL}", f"data.resolution={RESOLUTION}",
           "data.num_workers=0", "inversion.num_steps=5", "inversion.levels=[199,399,599,799,999]"]  # fmt: skip
    execute("invert", load_recipe(None, "invert", inv), run_inversion, overwrite=True, resume=inv_resume)
    result = QuickstartResult(str(root), len(PROMPTS), score.scored)
    for method, extra in (("smpo", ["inversion.source=cache", f"inversion.cache_path={cache}"]), ("dpo", [])):
        # x 4 pairs per step (scale_lr): 1e-4, a few steps move the samples without wrecking the model
        overrides = [f"data.path={scored}", f"output_dir={root / method}", f"train.max_steps={steps}", "optim.lr=2.5e-5",
                     f"model.pretrained={MODEL}", f"data.resolution={RESOLUTION}", *extra]  # fmt: skip
        trained = execute("train", load_recipe(f"tiny_{method}_cpu", "train", overrides), run_training, overwrite=True)
        bench = [f"model.pretrained={trained.model_path}", f"baseline.pretrained={MODEL}", f"prompts.path={prompts}",
                 f"output_dir={root / ('bench_' + method)}", "sampling.images_per_prompt=1", *size,
                 "rewards=[{name: pickscore, path: tiny}]"]  # fmt: skip
        benched = execute("bench", load_recipe(None, "bench", bench), run_benchmark, overwrite=True)
        last = trained.metrics[-1] if trained.metrics else {}
        win = benched.metrics["pickscore"]["win_rate_vs_baseline"]["win_rate"]
        result.runs.append({
            "method": method, "steps": trained.steps, "final_loss": trained.final_loss,
            "implicit_acc": last.get("implicit_acc"), "mean_p": last.get("mean_p"),
            "unet_calls_per_step": trained.unet_calls_per_step, "seconds": trained.seconds,
            "pickscore_win_rate_vs_base": win, "model": trained.model_path,
            "judge_accuracy": _judge_accuracy(root / f"bench_{method}" / "model_images"),
            "base_judge_accuracy": _judge_accuracy(root / f"bench_{method}" / "baseline_images"),
            "report": str(root / ("bench_" + method) / "report.html"),
        })  # fmt: skip
    return result


def _judge_accuracy(folder: Path) -> float:
    """Fraction of a bench side's images (one per caption) that the shapes judge finds correct."""
    import numpy as np
    from PIL import Image

    from smpo_cli.shapes.judge import judge_batch
    from smpo_cli.shapes.world import parse_caption

    images = np.stack([np.asarray(Image.open(folder / "images" / f"{i:05d}_00.png").convert("RGB")) for i in range(len(PROMPTS))])
    return float(np.mean([v.correct for v in judge_batch(images, [parse_caption(p) for p in PROMPTS])]))
