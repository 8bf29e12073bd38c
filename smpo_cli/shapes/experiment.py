"""``run_shapes_bench(recipe)``: SmPO vs Diffusion-DPO and ablations in the shapes world, with error bars.

Every step is a real smpo stage on the real on-disk formats:

1. **pairs**: ``smpo pairs`` samples ``pairs.images_per_caption`` images for each of ``pairs.count`` training
   captions from the base model and keeps the judge's best and worst; the annotator population labels them. ``pairs/pairs.jsonl`` holds,
   per pair, the human label (one sampled annotator's vote), the population's true preference, and two
   "scored" views that ``smpo train`` reads: ``human_winner`` (with p = 1) and ``judge_winner`` /
   ``judge_p`` (p = softmax of the judge's scores, already on [0, 1], so min-max normalisation is the
   identity);
2. **cache**: ``smpo invert`` computes the ReNoise trajectory cache of every pair once, with the base model;
3. **runs**: ``smpo train`` for every arm x seed, same pairs, steps, batch and learning rate;
4. **eval**: ``smpo generate`` on held-out and training captions in GenEval form with the same seeds for
   every model; the judge gives per-skill accuracy and score; the population gives the mean true
   preference over the base model's image of the same seed (and a win rate); distance from the base is
   the mean squared difference of the UNets' noise predictions on fixed noisy latents (a KL proxy);
5. **report**: ``results.json`` (per run and per arm: mean, 95% t-interval over seeds), ``results.md``,
   ``curves.png`` (training loss and implicit accuracy), ``grid.png`` (samples) and
   ``over_optimisation.png`` (score vs distance).

Finished stages and runs are reused on a rerun with the same recipe, so an interrupted experiment resumes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smpo_cli.config.schema import ShapesBenchRecipe, ShapesMethodSpec
from smpo_cli.errors import OutputDirError
from smpo_cli.utils.atomic import write_json, write_text
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

# two-sided 95% Student-t quantiles by degrees of freedom (n - 1)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
METRICS = ("accuracy", "heldout_accuracy", "score", "true_preference_vs_base", "win_rate_vs_base", "distance", "seconds")


@dataclass
class ShapesBenchResult:
    output_dir: str
    pairs: int
    reward_ties: int
    label_agreement: dict[str, float]
    base: dict[str, Any]
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    paired: dict[str, Any] = field(default_factory=dict)  # the balanced evaluation's paired changes
    pair_skills: dict[str, dict[str, float]] = field(default_factory=dict)  # pair_skill_stats of the pairs
    pair_mix: dict[str, Any] = field(default_factory=dict)  # the captions' skill weights and the headroom pilot

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_ci(values: list[float]) -> dict[str, float | None]:
    """Mean and 95% Student-t interval half-width over seeds (None with a single seed)."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = None
    if arr.size > 1:
        t = _T95.get(arr.size - 1, 1.96)
        half = float(t * arr.std(ddof=1) / math.sqrt(arr.size))
    return {"mean": float(arr.mean()), "ci95": half, "n": int(arr.size)}


# ------------------------------------------------------------------------------------------ resume
def _store(recipe: ShapesBenchRecipe):
    from smpo_cli.utils.shards import ShardStore

    return ShardStore(Path(recipe.output_dir), "runs", "", sidecar_dir=".smpo")


def fingerprint(recipe: ShapesBenchRecipe) -> dict[str, Any]:
    """What every run depends on: a rerun with other settings must not reuse these runs. The arms are not in it:
    each run folder records its own arm (``arm.json``), so arms can be added to a finished experiment."""
    data = recipe.model_dump(mode="json", exclude={"output_dir", "logging", "workers", "arms"})
    if recipe.pairs.skill_weights != "headroom":  # the pilot's size matters only to a pilot (and older folders lack it)
        data["pairs"].pop("pilot_captions_per_skill")
    return data


def resume_ok(recipe: ShapesBenchRecipe) -> bool:
    """True to resume a folder made with the same recipe (OutputDirError when made with another one)."""
    store = _store(recipe)
    if store.fingerprint_path.exists():  # a folder from before arms left the fingerprint: its runs' arms
        old = json.loads(store.fingerprint_path.read_text(encoding="utf-8"))
        if "arms" in old:
            arms = {a["name"]: a for a in old.pop("arms")}
            for run_dir in sorted((Path(recipe.output_dir) / "runs").glob("*-s*")):
                made = arms.get(run_dir.name.rsplit("-s", 1)[0])
                if made is not None and (run_dir / "run.json").exists() and not (run_dir / ARM_FILE).exists():
                    write_json(run_dir / ARM_FILE, made)
            store.write_fingerprint(old)
    return store.check_fingerprint(fingerprint(recipe), recipe.output_dir)


ARM_FILE = "arm.json"  # in each run folder: the arm it was trained as


def check_arm_runs(recipe: ShapesBenchRecipe, out: Path) -> None:
    """Before anything trains: every existing run folder of the recipe's arms was trained as the same arm."""
    from smpo_cli.utils.shards import _diff_keys

    for arm in recipe.arms:
        for seed in recipe.train.seeds:
            made_file = out / "runs" / f"{arm.name}-s{seed}" / ARM_FILE
            if not made_file.is_file():
                continue
            made = json.loads(made_file.read_text(encoding="utf-8"))
            if made != arm.model_dump(mode="json"):
                keys = ", ".join(sorted(_diff_keys(made, arm.model_dump(mode="json"))))
                raise OutputDirError(f"{made_file.parent} was trained as another arm {arm.name!r} ({keys})",
                                     hint=f"give the changed arm a new name, delete runs/{arm.name}-s* and "
                                          f"eval/{arm.name}-s* there, or choose another output_dir")  # fmt: skip


# ------------------------------------------------------------------------------------------ stages
def _execute(stage: str, data: dict[str, Any], core, resume) -> Any:
    from smpo_cli.runs import execute_nested

    return execute_nested(stage, data, core, resume, caller="smpo shapes run")


def _generate(recipe: ShapesBenchRecipe, model: str, prompts: Path, out: Path, images_per_prompt: int, seed: int):
    """The evaluation images of ``model`` (at ``eval.guidance_scale``, else the pairs' guidance)."""
    from smpo_cli.generation.runner import resume_ok, run_generation

    p = recipe.pairs
    guidance = p.guidance_scale if recipe.eval.guidance_scale is None else recipe.eval.guidance_scale
    data = {"stage": "generate", "seed": seed, "device": recipe.device, "output_dir": str(out),
            "model": {"pretrained": model, "dtype": "float32"}, "prompts": {"path": str(prompts)},
            "sampling": {"images_per_prompt": images_per_prompt, "num_inference_steps": p.num_inference_steps,
                         "guidance_scale": guidance, "batch_size": p.batch_size},
            "logging": {"progress": recipe.logging.progress}}  # fmt: skip
    return _execute("generate", data, run_generation, resume_ok)


def read_images(folder: Path, n_prompts: int, per_prompt: int) -> np.ndarray:
    """The images of a ``smpo generate`` folder, prompt-major: (prompt i, sample k) -> row i * per_prompt + k."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(folder / "images" / f"{i:05d}_{k:02d}.png").convert("RGB"))
                     for i in range(n_prompts) for k in range(per_prompt)])  # fmt: skip


def _sample_pairs(recipe: ShapesBenchRecipe, captions: list, folder: Path):
    """``smpo pairs`` on ``captions`` into ``folder/sampled`` (best and worst of ``pairs.images_per_caption`` by
    ``pairs.reward``); returns its table, each pair's two image files and the judge's verdicts on both."""
    import pyarrow.parquet as pq
    from PIL import Image

    from smpo_cli.pairs.runner import resume_ok, run_pairs
    from smpo_cli.shapes.judge import judge_batch

    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "captions.txt"
    write_text(prompts, "".join(c.text + "\n" for c in captions))
    p = recipe.pairs
    reward = ({"name": "pickscore", "path": "shapes-pickscore", "output": "cosine", "label": "reward"}
              if p.reward == "shapes-pickscore" else {"name": "shapes-judge", "label": "reward"})  # fmt: skip
    data = {"stage": "pairs", "seed": recipe.seed, "device": recipe.device, "output_dir": str(folder / "sampled"),
            "model": {"pretrained": recipe.model, "dtype": "float32"}, "prompts": {"path": str(prompts)},
            "sampling": {"images_per_prompt": p.images_per_caption, "num_inference_steps": p.num_inference_steps,
                         "guidance_scale": p.guidance_scale, "batch_size": p.batch_size},
            "rewards": [reward], "pairing": {"strategy": "best_worst"},
            "reward_batch_size": p.batch_size, "logging": {"progress": recipe.logging.progress}}  # fmt: skip
    _execute("pairs", data, run_pairs, resume_ok)
    table = pq.read_table(folder / "sampled" / "pairs.parquet").to_pylist()
    if len(table) != len(captions):
        raise RuntimeError(f"smpo pairs made {len(table)} pairs for {len(captions)} captions in {folder}")
    files = [[folder / "sampled" / r["image_0"], folder / "sampled" / r["image_1"]] for r in table]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for pair in files for f in pair])
    verdicts = judge_batch(images, [c for c in captions for _ in range(2)])
    return table, files, verdicts


def headroom_weights(one_correct: dict[str, int], pilots: dict[str, int]) -> dict[str, float]:
    """Each skill's weight: its share of pilot pairs with exactly one correct image, Laplace-smoothed
    ((k + 1) / (n + 2)) so that a skill with none in a small pilot keeps a few pairs."""
    return {skill: (one_correct[skill] + 1) / (pilots[skill] + 2) for skill in pilots}


def pilot_skill_weights(recipe: ShapesBenchRecipe, out: Path) -> dict[str, Any]:
    """``pairs.skill_weights=headroom``: sample ``pairs.pilot_captions_per_skill`` training captions of every skill
    (its own random stream), pick best vs worst as the pairs will be, judge both images, and weight each skill by
    ``headroom_weights``. Written to ``pairs/pilot/weights.json``."""
    from smpo_cli.shapes.world import SKILLS, sample_captions, split_captions

    folder = out / "pairs" / "pilot"
    done = folder / "weights.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    rng = np.random.default_rng([recipe.seed, 2])
    train_captions, _ = split_captions(recipe.split_seed)
    skills = [s for s in SKILLS if any(c.skill == s for c in train_captions)]
    n = recipe.pairs.pilot_captions_per_skill
    captions = [c for s in skills for c in sample_captions(rng, n, skill=s, pool=train_captions)]
    _, _, verdicts = _sample_pairs(recipe, captions, folder)
    teaching = Counter(c.skill for c, a, b in zip(captions, verdicts[0::2], verdicts[1::2], strict=True) if a.correct != b.correct)
    counts = {s: teaching[s] for s in skills}
    pilot = {"captions_per_skill": n, "one_correct": counts,
             "weights": headroom_weights(counts, {s: n for s in skills})}  # fmt: skip
    write_json(done, pilot)
    return pilot


def make_pairs(recipe: ShapesBenchRecipe, out: Path) -> dict[str, Any]:
    """Sample, score and label the pairs through ``smpo pairs``; write ``pairs.jsonl`` (what every arm trains on).

    ``smpo pairs`` samples ``images_per_caption`` images per caption from the base model, scores them with
    ``pairs.reward`` (the learned shapes-pickscore by default, as PickScore scores real data) and keeps each
    caption's best and worst; the annotator population then votes on each pair, as Pick-a-Pic's users voted on
    theirs, and the judge scores both images (the evaluator; its labels are the ``judge`` ablation). With
    ``pairs.skill_weights=headroom`` a pilot sets the caption mix first (``pilot_skill_weights``).
    """
    from smpo_cli.shapes.annotators import DEFAULT_POPULATION
    from smpo_cli.shapes.world import sample_captions, split_captions

    weights, pilot = recipe.pairs.skill_weights, None
    if weights == "headroom":
        pilot = pilot_skill_weights(recipe, out)
        weights = pilot["weights"]
    rng = np.random.default_rng([recipe.seed, 1])
    train_captions, _ = split_captions(recipe.split_seed)
    captions = sample_captions(rng, recipe.pairs.count, pool=train_captions, skill_weights=weights)
    p = recipe.pairs
    learned = p.reward == "shapes-pickscore"
    table, files, verdicts = _sample_pairs(recipe, captions, out / "pairs")
    va, vb = verdicts[0::2], verdicts[1::2]
    labels = DEFAULT_POPULATION.label_pairs(rng, va, vb, recipe.pairs.reward_noise_std)
    rows = []
    for i, c in enumerate(captions):
        human_winner = 0 if labels.labels[i] == 1 else 1
        r0, r1 = float(labels.reward_a[i]), float(labels.reward_b[i])
        judge_winner = 0 if r0 >= r1 else 1
        rw, rl = (r0, r1) if judge_winner == 0 else (r1, r0)
        # the judge's p: the softmax of the two scores, already on [0, 1] (min-max normalisation is the identity)
        judge_p = float(1.0 / (1.0 + math.exp(-(rw - rl))))
        rows.append({
            "image_0": str(files[i][0].resolve()), "image_1": str(files[i][1].resolve()),
            "prompt": c.text, "skill": c.skill, "label": float(labels.labels[i]),
            "true_p0": float(labels.true_preference[i]), "annotator": DEFAULT_POPULATION.annotators[labels.annotator[i]].name,
            "human_winner": human_winner, "human_p": 1.0,
            "judge_score_0": r0, "judge_score_1": r1, "judge_winner": judge_winner, "judge_p": judge_p,
            # pairs.reward's winner and p as smpo pairs wrote them (the judge's own when it is the reward)
            "reward_winner": int(table[i]["reward_winner"]) if learned else judge_winner,
            "reward_p": float(table[i]["reward_p"]) if learned else judge_p,
            "correct_0": bool(va[i].correct), "correct_1": bool(vb[i].correct), "smpo_row": i,
        })  # fmt: skip
    write_text(out / "pairs" / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    true_winner = np.array([0 if r["true_p0"] >= 0.5 else 1 for r in rows])
    decided = np.array([r["judge_score_0"] != r["judge_score_1"] for r in rows])
    agree = lambda key, keep: float(np.mean([r[key] == t for r, t, k in zip(rows, true_winner, keep, strict=True) if k]))  # noqa: E731
    everywhere = np.ones(len(rows), dtype=bool)
    return {
        "pairs": len(rows),
        "reward": p.reward,
        "reward_ties": int((~decided).sum()),  # pairs the judge cannot tell apart
        "label_agreement": {  # how often each label source names the population's preferred image
            "human_vote": agree("human_winner", everywhere),
            "reward": agree("reward_winner", everywhere),
            "judge_when_decided": agree("judge_winner", decided) if decided.any() else float("nan"),
        },
        "base_pair_accuracy": float(np.mean([v.correct for v in verdicts])),
        "skills": pair_skill_stats(rows),
        "skill_weights": weights,  # the caption mix (null: uniform), resolved from the pilot for headroom
        "pilot": pilot,
    }


def pair_skill_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per skill: its pairs, the share the judge cannot tell apart, and the share with exactly one correct image
    (the pairs that show the model what is right; both-wrong pairs have no headroom to teach)."""
    out = {}
    for skill in sorted({r["skill"] for r in rows}):
        mine = [r for r in rows if r["skill"] == skill]
        out[skill] = {"pairs": len(mine),
                      "judge_ties": float(np.mean([r["judge_score_0"] == r["judge_score_1"] for r in mine])),
                      "one_correct": float(np.mean([r["correct_0"] != r["correct_1"] for r in mine])),
                      "both_wrong": float(np.mean([not (r["correct_0"] or r["correct_1"]) for r in mine]))}  # fmt: skip
    return out


def invert_pairs(recipe: ShapesBenchRecipe, out: Path) -> Path:
    from smpo_cli.inversion.runner import resume_ok, run_inversion

    n = recipe.train.inversion_steps
    levels = [round((i + 1) * 1000 / n) - 1 for i in range(n)]
    data = {"stage": "invert", "seed": recipe.seed, "device": recipe.device, "output_dir": str(out / "cache"),
            "model": {"pretrained": recipe.model, "dtype": "float32"},
            "data": {"path": str(out / "pairs" / "pairs.jsonl"), "layout": "pairs", "resolution": 32, "num_workers": 0},
            "inversion": {"method": "renoise", "num_steps": n, "levels": levels, "batch_size": 64},
            "logging": {"progress": recipe.logging.progress}}  # fmt: skip
    _execute("invert", data, run_inversion, resume_ok)
    return out / "cache"


def train_arm(recipe: ShapesBenchRecipe, arm: ShapesMethodSpec, seed: int, out: Path) -> dict[str, Any]:
    """One training run; a finished run (run.json success) is reused."""
    from smpo_cli.training.runner import run_training

    run_dir = out / "runs" / f"{arm.name}-s{seed}"
    from smpo_cli.utils.rundir import RunDir

    done = RunDir(run_dir).finished_result()
    if done is not None:
        return done
    # not finished: evaluation images of an earlier run of this name would pass for this run's
    shutil.rmtree(out / "eval" / f"{arm.name}-s{seed}", ignore_errors=True)
    if run_dir.exists() and not list((run_dir / "checkpoints").glob("step-*")):
        shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to resume
    t = recipe.train
    data = {"stage": "train", "seed": seed, "device": recipe.device, "output_dir": str(run_dir),
            "model": {"pretrained": recipe.model, "dtype": "float32"},
            # the columns of pairs.jsonl: human_* (the vote), reward_* (pairs.reward), judge_* (the ablation)
            "data": {"path": str(out / "pairs" / "pairs.jsonl"), "reward": arm.labels,
                     "labels": "human" if arm.labels == "human" else "reward", "resolution": 32, "num_workers": 0,
                     "empty_prompt_prob": t.empty_prompt_prob},
            "method": {"name": arm.method, "beta": arm.beta or t.beta, "gamma": t.gamma, "binary_labels": arm.binary_labels},
            "inversion": {"source": arm.inversion, "cache_path": str(out / "cache") if arm.inversion == "cache" else None},
            "optim": {"name": "adamw", "lr": arm.lr or t.lr, "scale_lr": False, "weight_decay": 0.0,
                      "lr_scheduler": "constant_with_warmup" if t.warmup_steps else "constant", "warmup_steps": t.warmup_steps},
            # a killed experiment resumes each run from its newest checkpoint
            "train": {"batch_size": t.batch_size, "max_steps": t.steps, "resume": "auto",
                      "checkpoint_every_steps": max(1, t.steps // 8), "keep_checkpoints": 1},
            "logging": {"progress": recipe.logging.progress, "log_every_steps": max(1, t.steps // 30)}}  # fmt: skip
    result = _execute("train", data, run_training, lambda r: True)
    write_json(run_dir / ARM_FILE, arm.model_dump(mode="json"))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the pipeline is saved; checkpoints only resume
    return result.to_dict()


# ------------------------------------------------------------------------------------------ evaluation
def _stratified(pool, n: int, rng: np.random.Generator) -> list:
    """Up to ``n`` captions drawn round-robin across skills (every skill represented), in pool order."""
    by_skill: dict[str, list] = {}
    for c in pool:
        by_skill.setdefault(c.skill, []).append(c)
    queues = {s: [cs[i] for i in rng.permutation(len(cs))] for s, cs in sorted(by_skill.items())}
    chosen: list = []
    while len(chosen) < n and any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    keep = set(map(id, chosen))
    return [c for c in pool if id(c) in keep]


def eval_captions(recipe: ShapesBenchRecipe):
    """GenEval-form captions, stratified by skill: held-out ones, then training ones (deterministic by seed).
    The balanced evaluation (``eval.images_per_skill``) has no held-out part: every skill's training captions,
    one image per line (``smpo_cli.shapes.evaluation``)."""
    from smpo_cli.shapes.evaluation import balanced_eval
    from smpo_cli.shapes.world import split_captions

    train, heldout = split_captions(recipe.split_seed)
    if recipe.eval.images_per_skill:
        geneval = [c for c in train if c.geneval_form]
        return [], balanced_eval(geneval, recipe.eval.images_per_skill, recipe.eval.max_captions_per_skill)
    rng = np.random.default_rng([recipe.seed, 2])
    held = _stratified([c for c in heldout if c.geneval_form], recipe.eval.heldout_captions, rng)
    seen = _stratified([c for c in train if c.geneval_form], recipe.eval.train_captions, rng)
    return held, seen


def noise_predictions(model: str, captions: list[str], seed: int):
    """A model's noise predictions on fixed noisy latents (same latents and timesteps for every model, by ``seed``).

    The base model's are computed once; each run's distance from it is the mean squared difference.
    """
    import torch

    from smpo_cli.models.loading import load_components

    parts = load_components(model, dtype="float32", device="cpu", components=("unet", "text_encoder", "tokenizer"))
    gen = torch.Generator().manual_seed(seed)
    ids = parts.tokenizer(captions, padding="max_length", max_length=parts.tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids  # fmt: skip
    size = parts.unet.config.sample_size
    x = torch.randn(len(captions), 4, size, size, generator=gen)
    t = torch.randint(0, 1000, (len(captions),), generator=gen)
    with torch.inference_mode():
        return parts.unet(x, t, encoder_hidden_states=parts.text_encoder(ids)[0]).sample


def evaluate_model(recipe: ShapesBenchRecipe, model: str, name: str, out: Path, base_verdicts=None) -> dict[str, Any]:
    """Samples of ``model`` on the evaluation captions, judged; preferences against the base's same-seed images."""
    from smpo_cli.shapes.annotators import DEFAULT_POPULATION
    from smpo_cli.shapes.judge import judge_batch

    held, seen = eval_captions(recipe)
    captions = held + seen
    k = 1 if recipe.eval.images_per_skill else recipe.eval.images_per_caption
    folder = out / "eval"
    prompts = folder / "captions.txt"
    write_text(prompts, "".join(c.text + "\n" for c in captions))
    _generate(recipe, model, prompts, folder / name, k, recipe.seed + 1000)
    images = read_images(folder / name, len(captions), k)
    verdicts = judge_batch(images, [c for c in captions for _ in range(k)])
    correct = np.array([v.correct for v in verdicts])
    skills = np.array([c.skill for c in captions for _ in range(k)])
    heldout = np.array([i < len(held) for i in range(len(captions)) for _ in range(k)])
    row: dict[str, Any] = {
        "model": model,
        "accuracy": float(correct.mean()),
        "heldout_accuracy": float(correct[heldout].mean()) if heldout.any() else None,
        "train_caption_accuracy": float(correct[~heldout].mean()) if (~heldout).any() else None,
        "score": float(np.mean([v.score for v in verdicts])),
        "skills": {s: float(correct[skills == s].mean()) for s in sorted(set(skills.tolist()))},
    }
    if base_verdicts is not None:
        prefs = np.array([DEFAULT_POPULATION.true_preference(m, b) for m, b in zip(verdicts, base_verdicts, strict=True)])
        row["true_preference_vs_base"] = float(prefs.mean())
        row["win_rate_vs_base"] = float(np.mean(np.where(np.isclose(prefs, 0.5), 0.5, prefs > 0.5)))
    return row, verdicts


def paired_changes(recipe: ShapesBenchRecipe, captions: list, base: np.ndarray, correct: dict[str, list[np.ndarray]]):
    """Every arm - base and every arm - arm (in recipe order) on the balanced evaluation: each image's correctness
    averaged over the training seeds, a bootstrap stratified by skill, and the per-seed changes."""
    from smpo_cli.shapes.evaluation import eval_groups_of, paired_change
    from smpo_cli.shapes.world import split_captions

    train, _ = split_captions(recipe.split_seed)
    groups = eval_groups_of(captions, [c for c in train if c.geneval_form])
    skills = np.array([c.skill for c in captions])
    names = [a.name for a in recipe.arms]
    return {"eval_images": int(base.size),
            "arms": {a: paired_change(correct[a], base, skills, groups) for a in names},
            "comparisons": {f"{a} - {b}": paired_change(correct[a], correct[b], skills, groups)
                            for i, a in enumerate(names) for b in names[i + 1 :]}}  # fmt: skip


# ------------------------------------------------------------------------------------------ driver
def _train_and_evaluate(recipe: ShapesBenchRecipe, arm: ShapesMethodSpec, seed: int, out: Path, base_verdicts, probe: list[str],
                        base_noise, threads: int | None) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """One run: train (or reuse), sample the evaluation, judge it; its row and each image's correctness."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    logger.info("shapes bench: training %s, seed %d", arm.name, seed)
    trained = train_arm(recipe, arm, seed, out)
    row, verdicts = evaluate_model(recipe, trained["model_path"], f"{arm.name}-s{seed}", out, base_verdicts)
    row.update(arm=arm.name, seed=seed, seconds=trained["seconds"], final_loss=trained["final_loss"],
               distance=float((noise_predictions(trained["model_path"], probe, recipe.seed) - base_noise).pow(2).mean()))  # fmt: skip
    return row, np.array([v.correct for v in verdicts], dtype=float)


def run_shapes_bench(recipe: ShapesBenchRecipe) -> ShapesBenchResult:
    from smpo_cli.shapes.report import write_curves, write_grid, write_markdown, write_over_optimisation

    started = time.perf_counter()
    out = Path(recipe.output_dir)
    _store(recipe).write_fingerprint(fingerprint(recipe))
    check_arm_runs(recipe, out)
    logger.info("shapes bench: sampling and labelling %d pairs", recipe.pairs.count)
    pair_stats = make_pairs(recipe, out)
    if any(a.inversion == "cache" for a in recipe.arms):
        logger.info("shapes bench: ReNoise inversion cache of every pair")
        invert_pairs(recipe, out)
    base_row, base_verdicts = evaluate_model(recipe, recipe.model, "base", out)
    held, seen = eval_captions(recipe)
    probe = list(dict.fromkeys(c.text for c in held + seen))  # the captions of the distance probe
    base_noise = noise_predictions(recipe.model, probe, recipe.seed)
    jobs = [(arm, seed) for arm in recipe.arms for seed in recipe.train.seeds]
    shared = (out, base_verdicts, probe, base_noise)
    if recipe.workers > 1 and len(jobs) > 1:  # independent runs in parallel one-thread processes
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        quiet = recipe.model_copy(update={"logging": recipe.logging.model_copy(update={"progress": False})})
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        with ProcessPoolExecutor(min(recipe.workers, len(jobs)), mp_context=context) as pool:
            done = list(pool.map(_train_and_evaluate, *zip(*[(quiet, arm, seed, *shared, 1) for arm, seed in jobs], strict=True)))
    else:
        done = [_train_and_evaluate(recipe, arm, seed, *shared, None) for arm, seed in jobs]
    runs, correct = [row for row, _ in done], {}
    for (arm, _), (_, ok) in zip(jobs, done, strict=True):
        correct.setdefault(arm.name, []).append(ok)
    arms = {}
    for arm in recipe.arms:
        mine = [r for r in runs if r["arm"] == arm.name]
        summary = {m: mean_ci([r.get(m) for r in mine]) for m in METRICS}
        skills = sorted({s for r in mine for s in r["skills"]})
        summary["skills"] = {s: mean_ci([r["skills"].get(s) for r in mine]) for s in skills}
        arms[arm.name] = summary
    paired = {}
    if recipe.eval.images_per_skill:  # seed-paired changes with bootstrap intervals (GenEval-balanced)
        paired = paired_changes(recipe, seen, np.array([v.correct for v in base_verdicts], dtype=float), correct)
    result = ShapesBenchResult(str(out), pair_stats["pairs"], pair_stats["reward_ties"], pair_stats["label_agreement"],
                               base_row, arms, runs, round(time.perf_counter() - started, 1), paired,
                               pair_stats["skills"], {"weights": pair_stats["skill_weights"], "pilot": pair_stats["pilot"]})  # fmt: skip
    write_json(out / "results.json", {**result.to_dict(), "pair_stats": pair_stats,
                                      "recipe": recipe.model_dump(mode="json")})  # fmt: skip
    write_text(out / "results.md", write_markdown(result, recipe))
    write_curves(out, recipe, out / "curves.png")
    write_over_optimisation(result, out / "over_optimisation.png")
    write_grid(out, recipe, out / "grid.png")
    return result
