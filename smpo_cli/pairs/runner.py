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
from smpo_cli.utils.distributed import barrier, is_main_process, world_size
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


def _generate_recipe(recipe: PairsRecipe, out: Path):
    from smpo_cli.config.loader import validate

    data = {"stage": "generate", "seed": recipe.seed, "device": recipe.device, "output_dir": str(out / "samples"),
            "model": recipe.model.model_dump(mode="json"), "prompts": recipe.prompts.model_dump(mode="json"),
            "sampling": recipe.sampling.model_dump(mode="json"), "logging": recipe.logging.model_dump(mode="json")}  # fmt: skip
    return validate(data, "generate", source="(smpo pairs: generate)")


def _generate(recipe: PairsRecipe, out: Path) -> Path:
    from smpo_cli.config import LoadedRecipe
    from smpo_cli.generation.runner import resume_ok, run_generation
    from smpo_cli.runs import execute

    execute("generate", LoadedRecipe(_generate_recipe(recipe, out), "(smpo pairs: generate)"), run_generation,
            resume=resume_ok)  # fmt: skip
    return out / "samples"


def _scorer(recipe: PairsRecipe, out: Path):
    """The chunk scorer of this process over the images generation will write (its prompts, its file names)."""
    from smpo_cli.generation.prompts import load_prompts
    from smpo_cli.generation.runner import image_path
    from smpo_cli.pairs.scorer import ChunkScorer
    from smpo_cli.utils.logging import process_rank

    gen = _generate_recipe(recipe, out)
    n = recipe.sampling.images_per_prompt
    prompts = load_prompts(recipe.prompts.path, column=recipe.prompts.column, limit=recipe.prompts.limit)
    files = [image_path(gen, rec.index, k) for rec in prompts for k in range(n)]
    return ChunkScorer(recipe, out, files, [rec.prompt for rec in prompts], n, rank=process_rank(), world=world_size())


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
    scorer = _scorer(recipe, out)
    if is_main_process():
        _store(recipe).write_fingerprint(fingerprint(recipe))
        scorer.prepare()
    barrier()
    if recipe.pipeline:  # score each chunk of images while the next ones are generated
        with scorer.in_background():
            samples = _generate(recipe, out)
    else:
        samples = _generate(recipe, out)
    scorer.finish()
    barrier()  # every process's chunks are on disk
    if not is_main_process():
        barrier()  # the main process writes the pairs
        return PairsResult(**json.loads((out / "summary.json").read_text(encoding="utf-8")))
    files, prompts = read_samples(samples, n)
    per_image_prompts = [p for p in prompts for _ in range(n)]
    normalised, columns, rewards_info = [], {}, []
    weights = np.array([r.weight for r in recipe.rewards])
    raw_by_label = {}
    for spec, scored in zip(recipe.rewards, scorer.collect().values(), strict=True):
        raw, output = scored.values, scored.output
        rng_info = _range(spec, output, scored.known_range, raw)
        normalised.append(pairing.normalise(raw, rng_info["r_min"], rng_info["r_max"]).reshape(len(prompts), n))
        raw_by_label[spec.prefix] = (raw.reshape(len(prompts), n), output)
        rewards_info.append({"label": spec.prefix, "name": spec.name, "output": output, "weight": spec.weight,
                             "normalization": rng_info, "reward": scored.metadata})  # fmt: skip
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
    if recipe.images == "bytes":  # the encoded PNG in the table: the folder's samples/ are then not needed
        rel = lambda i, k: (samples / files[i * n + k]).read_bytes()  # noqa: E731
    else:  # paths relative to the run folder, so the folder can move
        rel = lambda i, k: str((samples / files[i * n + k]).relative_to(out))  # noqa: E731
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
    barrier()  # the other processes read summary.json
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
