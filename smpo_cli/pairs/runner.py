"""``run_pairs(recipe)``: preference pairs from your own prompts (``smpo pairs``).

1. **samples**: ``smpo generate`` (its own code, seeds and resume) writes ``images_per_prompt`` images per
   prompt into ``samples/``;
2. **scores**: every reward model scores every image once (``scores/<label>.json``, reused on a rerun);
3. **pairs** (``pairs.pairing``): normalised rewards, the utility each image is ranked by, the chosen pairs,
   each model's p and the weighted mixture's winner and p;
4. ``pairs.parquet``: the scored-pairs format ``smpo invert`` and ``smpo train`` read (image paths relative
   to the run folder, so the folder can move), ``image_scores.jsonl`` (one row per image) and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smpo_cli.config.schema import PairsRecipe, PairsRewardSpec
from smpo_cli.errors import DataError
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)
PAIRS_FILE = "pairs.parquet"


@dataclass
class PairsResult:
    output_dir: str
    pairs_path: str
    prefix: str
    prompts: int
    images: int
    pairs: int
    rewards: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _generate(recipe: PairsRecipe, out: Path) -> Path:
    from smpo_cli.generation.runner import resume_ok, run_generation
    from smpo_cli.runs import execute_nested

    data = {"stage": "generate", "seed": recipe.seed, "device": recipe.device, "output_dir": str(out / "samples"),
            "model": recipe.model.model_dump(mode="json"), "prompts": recipe.prompts.model_dump(mode="json"),
            "sampling": recipe.sampling.model_dump(mode="json"), "logging": recipe.logging.model_dump(mode="json")}  # fmt: skip
    execute_nested("generate", data, run_generation, resume_ok, caller="smpo pairs")
    return out / "samples"


def read_samples(folder: Path, per_prompt: int) -> tuple[list[str], list[str]]:
    """(image files relative to the samples folder, prompt-major; one prompt per prompt index) of a generate run."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines() if line]
    grid = {(r["prompt_index"], r["sample_index"]): r for r in rows}
    n_prompts = 1 + max(r["prompt_index"] for r in rows) if rows else 0
    missing = [(i, k) for i in range(n_prompts) for k in range(per_prompt) if (i, k) not in grid]
    if missing:
        raise DataError(f"{folder}/metadata.jsonl: {len(missing)} images missing (first: prompt {missing[0][0]}, "
                        f"sample {missing[0][1]})", hint="rerun smpo pairs: generation resumes")  # fmt: skip
    files = [grid[(i, k)]["file"] for i in range(n_prompts) for k in range(per_prompt)]
    return files, [grid[(i, 0)]["prompt"] for i in range(n_prompts)]


def _score(spec: PairsRewardSpec, recipe: PairsRecipe, images: list[Path], prompts: list[str], cache: Path):
    """Raw scores of every image, and the reward's metadata, output and known range; cached per reward."""
    import torch
    from PIL import Image

    from smpo_cli.rewards import load_reward
    from smpo_cli.scoring.runner import choose_output
    from smpo_cli.utils.atomic import write_json
    from smpo_cli.utils.devices import resolve_device

    device = resolve_device(recipe.device)
    dtype = recipe.reward_dtype if recipe.reward_dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    key = {"reward": spec.model_dump(mode="json", exclude={"weight", "label", "quantiles", "r_min", "r_max"}),
           "images": len(images), "dtype": dtype}  # fmt: skip
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return np.array(saved["scores"], dtype=np.float64), saved["metadata"], saved["output"], saved["known_range"]
    path = spec.path
    if path == "tiny":
        from smpo_cli.rewards.tiny import tiny_reward_path

        path = str(tiny_reward_path(spec.name, build=True))
    reward = load_reward(spec.name, path, device=str(device), dtype=dtype, batch_size=recipe.reward_batch_size,
                         **spec.options)  # fmt: skip
    output = choose_output(spec.output, reward, f"rewards[{spec.prefix}].output")
    scores = []
    batch = recipe.reward_batch_size
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            pil = [Image.open(p).convert("RGB") for p in images[s : s + batch]]
            scores.append(reward.score(pil, prompts[s : s + batch])[output].numpy())
    values = np.concatenate(scores).astype(np.float64)
    known = reward.known_range(output)
    write_json(cache, {"key": key, "scores": values.tolist(), "metadata": reward.metadata, "output": output,
                       "known_range": list(known) if known else None})  # fmt: skip
    return values, reward.metadata, output, list(known) if known else None


def _range(spec: PairsRewardSpec, output: str, known, scores: np.ndarray) -> dict[str, Any]:
    from smpo_cli.pairs.pairing import quantile_range
    from smpo_cli.scoring.preference import PICKSCORE_COSINE_R_MAX, PICKSCORE_COSINE_R_MIN

    if spec.r_min is not None:
        return {"mode": "fixed", "r_min": spec.r_min, "r_max": spec.r_max}
    if known:
        return {"mode": "model", "r_min": float(known[0]), "r_max": float(known[1])}
    if spec.name == "pickscore" and output == "cosine":
        return {"mode": "official", "r_min": PICKSCORE_COSINE_R_MIN, "r_max": PICKSCORE_COSINE_R_MAX}
    try:
        lo, hi = quantile_range(scores, spec.quantiles)
    except ValueError as exc:
        raise DataError(f"rewards[{spec.prefix}]: {exc}", hint="set its r_min and r_max, or sample more images") from None
    return {"mode": "quantiles", "quantiles": list(spec.quantiles), "r_min": lo, "r_max": hi}


def run_pairs(recipe: PairsRecipe) -> PairsResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from smpo_cli.pairs import pairing
    from smpo_cli.scoring.runner import METADATA_KEY
    from smpo_cli.utils.atomic import atomic_path, write_json, write_text

    started = time.perf_counter()
    out = Path(recipe.output_dir)
    n = recipe.sampling.images_per_prompt
    _store(recipe).write_fingerprint(fingerprint(recipe))
    samples = _generate(recipe, out)
    files, prompts = read_samples(samples, n)
    image_paths = [samples / f for f in files]
    per_image_prompts = [p for p in prompts for _ in range(n)]
    normalised, columns, rewards_info = [], {}, []
    weights = np.array([r.weight for r in recipe.rewards])
    raw_by_label = {}
    for spec in recipe.rewards:
        raw, meta, output, known = _score(spec, recipe, image_paths, per_image_prompts, out / "scores" / f"{spec.prefix}.json")
        rng_info = _range(spec, output, known, raw)
        normalised.append(pairing.normalise(raw, rng_info["r_min"], rng_info["r_max"]).reshape(len(prompts), n))
        raw_by_label[spec.prefix] = (raw.reshape(len(prompts), n), output)
        rewards_info.append({"label": spec.prefix, "name": spec.name, "output": output, "weight": spec.weight,
                             "normalization": rng_info, "reward": meta})  # fmt: skip
    utility = sum(w * r for w, r in zip(weights, normalised, strict=True)) / weights.sum()
    chosen = pairing.choose_pairs(utility, recipe.pairing.strategy, k=recipe.pairing.k,
                                  pairs_per_prompt=recipe.pairing.pairs_per_prompt,
                                  min_margin=recipe.pairing.min_margin, rng=np.random.default_rng([recipe.seed, 7]))  # fmt: skip
    if len(chosen) == 0:
        raise DataError(f"no pairs: every candidate pair's utility gap is below pairing.min_margin={recipe.pairing.min_margin}",
                        hint="lower pairing.min_margin or sample more images per prompt")  # fmt: skip
    pi, a, b = chosen.T
    p0s = np.stack([pairing.model_p0(r[pi, a], r[pi, b]) for r in normalised])
    p0, winner, p = pairing.mixture(p0s, weights)
    rel = lambda i, k: str((samples / files[i * n + k]).relative_to(out))  # noqa: E731 (paths relative to the run folder)
    columns["image_0"] = [rel(i, k) for i, k in zip(pi, a, strict=True)]
    columns["image_1"] = [rel(i, k) for i, k in zip(pi, b, strict=True)]
    columns["prompt"] = [prompts[i] for i in pi]
    columns["prompt_index"], columns["sample_0"], columns["sample_1"] = pi, a, b
    columns["utility_0"], columns["utility_1"] = utility[pi, a], utility[pi, b]
    for spec, p0_m in zip(recipe.rewards, p0s, strict=True):
        raw, output = raw_by_label[spec.prefix]
        columns[f"{spec.prefix}_{output}_0"], columns[f"{spec.prefix}_{output}_1"] = raw[pi, a], raw[pi, b]
        w_m = np.where(p0_m >= 0.5, 0, 1).astype(np.int8)
        columns[f"{spec.prefix}_winner"], columns[f"{spec.prefix}_p"] = w_m, np.where(w_m == 0, p0_m, 1 - p0_m)
    prefix = recipe.pair_prefix
    columns[f"{prefix}_winner"], columns[f"{prefix}_p"] = winner, p
    columns["smpo_row"] = np.arange(len(chosen))
    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    meta = {"stage": "pairs", "prefix": prefix, "rewards": rewards_info, "pairing": recipe.pairing.model_dump(mode="json")}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    pairs_path = out / PAIRS_FILE
    with atomic_path(pairs_path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    lines = [json.dumps({"file": str((samples / files[j]).relative_to(out)), "prompt_index": j // n, "sample_index": j % n,
                         "prompt": per_image_prompts[j],
                         **{s.prefix: float(raw_by_label[s.prefix][0].ravel()[j]) for s in recipe.rewards}})
             for j in range(len(files))]  # fmt: skip
    write_text(out / "image_scores.jsonl", "".join(line + "\n" for line in lines))
    summary = {prefix: pairing.pair_summary(utility[pi, a] - utility[pi, b], p)}
    for spec, norm, p0_m in zip(recipe.rewards, normalised, p0s, strict=True):
        summary[spec.prefix] = {"agreement_with_mixture": float(np.mean(np.where(p0_m >= 0.5, 0, 1) == winner)),
                                **pairing.pair_summary(norm[pi, a] - norm[pi, b], np.maximum(p0_m, 1 - p0_m))}  # fmt: skip
    result = PairsResult(output_dir=str(out), pairs_path=str(pairs_path), prefix=prefix, prompts=len(prompts),
                         images=len(files), pairs=int(len(chosen)), rewards=rewards_info, summary=summary,
                         seconds=round(time.perf_counter() - started, 1))  # fmt: skip
    write_json(out / "summary.json", result.to_dict())
    return result


def fingerprint(recipe: PairsRecipe) -> dict[str, Any]:
    """What the samples depend on: a rerun with other rewards or pairing reuses the images (and unchanged scores)."""
    return recipe.model_dump(mode="json", include={"seed", "model", "prompts", "sampling"}, exclude={"sampling": {"batch_size"}})


def _store(recipe: PairsRecipe):
    from smpo_cli.utils.shards import ShardStore

    return ShardStore(Path(recipe.output_dir), "pairs", "", sidecar_dir=".smpo")


def resume_ok(recipe: PairsRecipe) -> bool:
    """True to resume a folder sampled with the same settings (OutputDirError when sampled with others)."""
    return _store(recipe).check_fingerprint(fingerprint(recipe), recipe.output_dir)
