"""``run_rounds(recipe)``: iterative (self-play) alignment, ``smpo rounds``.

Each round ``r`` samples preference pairs from the current model (``smpo pairs``), builds the inversion cache
when the train recipe trains from one (``smpo invert``) and trains the current model on the pairs (``smpo
train``: the policy starts from, and the reference is, the current model, as in iterative DPO). The trained
model is the next round's: a full fine-tune's ``pipeline/``, or for LoRA the adapter fused into a full pipeline
(``round_<r>/model``), so every round loads a plain checkpoint.

Every stage of every round is its own run folder, made by that stage's own code and resumed as that stage
resumes (a finished train run is kept; an interrupted one continues from its newest checkpoint), so a killed
``smpo rounds`` redoes only what is missing. Round ``r`` uses ``seed + r``. With ``evaluate_final`` the last
model is sampled with round 0's seeds (``eval/``), so its rewards pair image by image with the start model's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smpo_cli.config.schema import RoundsRecipe, RoundStageSpec
from smpo_cli.errors import OutputDirError, RecipeError
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

# model keys a round sets for every stage (the others: dtype, family, lora_scale stay the stage recipe's)
MODEL_KEYS = ("pretrained", "vae", "unet", "config", "revision", "variant")


@dataclass
class RoundsResult:
    output_dir: str
    rounds: list[dict[str, Any]]
    final_model: str
    evaluation: dict[str, Any] | None = None
    seconds: float = 0.0
    summary_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ stage recipes
def raw_recipe(spec: RoundStageSpec, stage: str) -> dict[str, Any]:
    """``spec``'s recipe with its overrides applied, not yet validated (the round fills in its keys first)."""
    from smpo_cli.config.loader import migrate, read_yaml, resolve_recipe_path
    from smpo_cli.config.overrides import apply_overrides, parse_overrides

    data: dict[str, Any] = {"stage": stage}
    if spec.recipe is not None:
        data = migrate(read_yaml(resolve_recipe_path(spec.recipe, stage)))[0]
        if data.get("stage") != stage:
            raise RecipeError(f"{spec.recipe} is a {data.get('stage')!r} recipe, not a {stage!r} recipe",
                              hint=f"name a {stage} recipe in this rounds recipe's {stage} block")  # fmt: skip
    return apply_overrides(data, parse_overrides(spec.overrides))


def stage_recipe(spec: RoundStageSpec, stage: str, forced: dict[str, Any], where: str):
    """``spec``'s recipe with its overrides, then the round's settings ``forced`` (dotted keys), validated."""
    from smpo_cli.config.loader import validate
    from smpo_cli.config.overrides import Override, apply_overrides, parse_overrides

    clash = sorted({o.key for o in parse_overrides(spec.overrides)} & set(forced))
    if clash:
        raise RecipeError(f"{where}.overrides sets {', '.join(clash)}, which smpo rounds sets for every round",
                          hint=f"remove it from {where}.overrides (the start model is rounds' model key)")  # fmt: skip
    data = apply_overrides(raw_recipe(spec, stage), [Override(k, v, f"{k}={v}") for k, v in forced.items()])
    return validate(data, stage, source=f"(smpo rounds: {where} = {spec.recipe or 'defaults'})")


def _model_forced(model: dict[str, Any]) -> dict[str, Any]:
    return {f"model.{k}": model.get(k) for k in MODEL_KEYS}


def start_model(recipe: RoundsRecipe) -> dict[str, Any]:
    """Round 0's model keys: the train recipe's model block, its pretrained replaced by ``recipe.model``."""
    train = raw_recipe(recipe.train, "train").get("model") or {}
    model = {k: train.get(k) for k in MODEL_KEYS}
    if recipe.model:
        model = {**dict.fromkeys(MODEL_KEYS), "pretrained": recipe.model}
    return model


def round_recipes(recipe: RoundsRecipe, r: int, model: dict[str, Any]) -> dict[str, Any]:
    """The pairs, invert (or None) and train recipes of round ``r`` sampling from and training ``model``."""
    rdir = Path(recipe.output_dir) / f"round_{r}"
    forced = _model_forced(model)
    pairs = stage_recipe(recipe.pairs, "pairs", {**forced, "model.lora": None, "output_dir": str(rdir / "pairs"),
                                                 "seed": recipe.seed + r}, "pairs")  # fmt: skip
    cache = (raw_recipe(recipe.train, "train").get("inversion") or {}).get("source") == "cache"
    invert = None
    if cache:
        if recipe.invert is None:
            raise RecipeError("the train recipe has inversion.source=cache but this rounds recipe has no invert stage",
                              hint="add invert: {recipe: <an invert recipe>} or set inversion.source=online/none in train")  # fmt: skip
        invert = stage_recipe(recipe.invert, "invert", {
            **forced, "output_dir": str(rdir / "cache"), "data.path": str(rdir / "pairs"), "data.layout": "pairs",
            "data.split": None, "seed": recipe.seed + r}, "invert")  # fmt: skip
    train = stage_recipe(recipe.train, "train", {
        **forced, "output_dir": str(rdir / "train"), "data.path": str(rdir / "pairs"), "data.split": None,
        "data.reward": pairs.pair_prefix, "data.labels": "reward",  # sampled pairs carry no human label
        "inversion.cache_path": str(rdir / "cache") if cache else None,
        "train.resume": "auto", "seed": recipe.seed + r}, "train")  # fmt: skip
    return {"pairs": pairs, "invert": invert, "train": train}


def eval_recipe(recipe: RoundsRecipe, model: dict[str, Any]):
    """The pairs recipe on ``model`` with round 0's seed: its images pair with round 0's, seed for seed."""
    return stage_recipe(recipe.pairs, "pairs", {**_model_forced(model), "model.lora": None, "seed": recipe.seed,
                                                "output_dir": str(Path(recipe.output_dir) / "eval")}, "pairs")  # fmt: skip


def check(recipe: RoundsRecipe) -> list[str]:
    """Round 0's stage recipes validated before anything runs (``--dry-run`` and the start of a run)."""
    model = start_model(recipe)
    stages = round_recipes(recipe, 0, model)
    lines = [f"start model: {model['pretrained']}"]
    p = stages["pairs"]
    lines.append(f"pairs: {p.prompts.path}, {p.sampling.images_per_prompt} images per prompt, "
                 f"rewards {', '.join(r.prefix for r in p.rewards)}, pairing {p.pairing.strategy}")  # fmt: skip
    if stages["invert"] is not None:
        inv = stages["invert"].inversion
        lines.append(f"invert: {inv.method}, {inv.num_steps}-level grid, levels {inv.levels}")
    t = stages["train"]
    kind = f"LoRA rank {t.train.lora_rank} (fused after each round)" if t.train.lora_rank else "full fine-tuning"
    lines.append(f"train: {t.method.name}, inversion {t.inversion.source}, {t.train.max_steps} steps, {kind}")
    return lines


# ------------------------------------------------------------------------------------------ running stages
def _same_recipe(folder: Path, recipe) -> bool:
    from smpo_cli.config import dump_recipe
    from smpo_cli.utils.rundir import RESOLVED_RECIPE

    path = folder / RESOLVED_RECIPE
    return path.is_file() and path.read_text(encoding="utf-8") == dump_recipe(recipe)


def _run(stage: str, recipe, core, resume) -> dict[str, Any]:
    """One stage's run folder: kept when finished with the same recipe, resumed when unfinished, else refused."""
    from smpo_cli.config import LoadedRecipe
    from smpo_cli.runs import execute
    from smpo_cli.utils.rundir import RunDir

    folder = Path(recipe.output_dir)
    if folder.exists() and any(folder.iterdir()):
        if not _same_recipe(folder, recipe):
            raise OutputDirError(f"{folder} was made with other settings than this rounds recipe gives it",
                                 hint="rerun with --overwrite (starts every round again) or choose another output_dir")  # fmt: skip
        done = RunDir(folder).finished_result()
        if done is not None:
            logger.info("%s: finished earlier, kept", folder)
            return done
    result = execute(stage, LoadedRecipe(recipe, f"(smpo rounds: {stage})"), core, resume=resume)
    return result.to_dict()


def _fuse(train, lora_dir: str, dest: Path) -> str:
    """The round's LoRA fused into a full pipeline at ``dest`` (by the main process; the others wait)."""
    from smpo_cli.training.export import fuse_lora_pipeline
    from smpo_cli.utils.distributed import barrier, is_main_process

    if is_main_process() and not (dest / "model_index.json").is_file():
        m = train.model
        fuse_lora_pipeline(m.pretrained, lora_dir, dest, vae=m.vae, unet=m.unet, config=m.config,
                           revision=m.revision, variant=m.variant)  # fmt: skip
    barrier()
    return str(dest)


def _reward_means(pairs_dir: Path) -> dict[str, float]:
    rows = _image_scores(pairs_dir)
    labels = [k for k in rows[0] if k not in ("file", "prompt_index", "sample_index", "prompt")]
    return {k: float(np.mean([r[k] for r in rows])) for k in labels}


def _image_scores(pairs_dir: Path) -> list[dict[str, Any]]:
    text = (pairs_dir / "image_scores.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]


def paired_change(start_dir: Path, final_dir: Path) -> dict[str, Any]:
    """Per reward: final minus start model's score on the same prompts and seeds, cluster-bootstrap 95% CI by prompt."""
    from smpo_cli.benchmark.metrics import paired_bootstrap

    start = {(r["prompt_index"], r["sample_index"]): r for r in _image_scores(start_dir)}
    final = {(r["prompt_index"], r["sample_index"]): r for r in _image_scores(final_dir)}
    keys = sorted(start.keys() & final.keys())
    labels = [k for k in start[keys[0]] if k not in ("file", "prompt_index", "sample_index", "prompt")]
    groups = [k[0] for k in keys]
    out = {}
    for label in labels:
        a = np.array([final[k][label] for k in keys])
        b = np.array([start[k][label] for k in keys])
        out[label] = {"start": float(b.mean()), "final": float(a.mean()), "change": paired_bootstrap(a, b, groups),
                      "final_wins": float(np.mean(np.where(a == b, 0.5, a > b)))}  # fmt: skip
    return out


def run_rounds(recipe: RoundsRecipe) -> RoundsResult:
    from smpo_cli.inversion.runner import resume_ok as invert_resume
    from smpo_cli.inversion.runner import run_inversion
    from smpo_cli.pairs.runner import resume_ok as pairs_resume
    from smpo_cli.pairs.runner import run_pairs
    from smpo_cli.training.runner import run_training
    from smpo_cli.utils.atomic import write_json
    from smpo_cli.utils.distributed import is_main_process

    started = time.perf_counter()
    out = Path(recipe.output_dir)
    check(recipe)  # every stage recipe valid before the first image is sampled
    model = start_model(recipe)
    rounds: list[dict[str, Any]] = []
    for r in range(recipe.rounds):
        stages = round_recipes(recipe, r, model)
        logger.info("round %d of %d: sampling from %s", r + 1, recipe.rounds, model["pretrained"])
        pairs = _run("pairs", stages["pairs"], run_pairs, pairs_resume)
        if stages["invert"] is not None:
            _run("invert", stages["invert"], run_inversion, invert_resume)
        trained = _run("train", stages["train"], run_training, lambda rec: True)
        path = trained["model_path"]
        if stages["train"].train.lora_rank is not None:
            path = _fuse(stages["train"], path, out / f"round_{r}" / "model")
        prefix = pairs["prefix"]
        rounds.append({
            "round": r, "sampled_from": model["pretrained"], "trained_model": path, "pairs": pairs["pairs"],
            "reward_mean": _reward_means(out / f"round_{r}" / "pairs"),
            "mean_p": pairs["summary"][prefix]["p"].get("mean"), "tie_fraction": pairs["summary"][prefix]["tie_fraction"],
            "final_loss": trained.get("final_loss"),
        })  # fmt: skip
        model = {**dict.fromkeys(MODEL_KEYS), "pretrained": path}
    evaluation = None
    if recipe.evaluate_final:
        _run("pairs", eval_recipe(recipe, model), run_pairs, pairs_resume)
        evaluation = {"model": model["pretrained"], "reward_mean": _reward_means(out / "eval"),
                      "vs_start": paired_change(out / "round_0" / "pairs", out / "eval")}  # fmt: skip
    result = RoundsResult(output_dir=str(out), rounds=rounds, final_model=model["pretrained"], evaluation=evaluation,
                          seconds=round(time.perf_counter() - started, 1), summary_path=str(out / "summary.json"))  # fmt: skip
    if is_main_process():
        write_json(out / "summary.json", result.to_dict())
    return result


def resume_ok(recipe: RoundsRecipe) -> bool:
    """A rerun of the same rounds recipe continues its folder (each stage then keeps or resumes its own)."""
    folder = Path(recipe.output_dir)
    if not folder.exists() or not any(folder.iterdir()):
        return False
    if not _same_recipe(folder, recipe):
        raise OutputDirError(f"output_dir {folder} holds a rounds run with other settings",
                             hint="pass --overwrite to start again, or set output_dir=... to a new folder")  # fmt: skip
    return True
