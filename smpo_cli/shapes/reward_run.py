"""``run_shapes_reward(recipe)``: train ``shapes-pickscore`` end to end (``smpo shapes reward``).

1. **samples**: for each ``samples[i]``, ``smpo generate`` draws ``images_per_caption`` images of each of
   ``captions`` training captions from that model (finished folders are reused on a rerun);
2. **votes**: the judge reads every image; every pair of images of one caption gets one sampled
   annotator's vote (``shapes.annotators``); the pairs of ``heldout_fraction`` of the caption texts are
   kept out of training;
3. **training** (``shapes.reward_model``): contrastive pretraining on renders, then PickScore's objective
   on the training votes;
4. **evaluation**: on the held-out pairs, how often the reward, the judge's score and the population's
   preference name the image the vote chose, and how often the reward agrees with the population's
   side; near-miss accuracy on fresh renders;
5. ``reward/``: the folder ``load_reward("pickscore", ...)`` reads, with ``smpo_reward.json`` holding the
   cosine range for SmPO's min-max normalisation; ``summary.json``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smpo_cli.config.schema import ShapesRewardRecipe
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)
IMAGE_SIZE = 32  # the shapes world's renders and models


@dataclass
class ShapesRewardResult:
    output_dir: str
    reward_dir: str
    train_pairs: int
    heldout_pairs: int
    vote_accuracy: dict[str, Any]
    population_agreement: dict[str, Any]
    near_miss_accuracy: dict[str, float]
    cosine_range: list[float]
    losses: dict[str, float]
    parameters: int
    seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ resume
def _store(recipe: ShapesRewardRecipe):
    from smpo_cli.utils.shards import ShardStore

    return ShardStore(Path(recipe.output_dir), "samples", "", sidecar_dir=".smpo")


def fingerprint(recipe: ShapesRewardRecipe) -> dict[str, Any]:
    """What the samples depend on: a rerun that changes only training settings reuses them."""
    return recipe.model_dump(mode="json", include={"seed", "split_seed", "samples", "num_inference_steps", "device"})


def resume_ok(recipe: ShapesRewardRecipe) -> bool:
    """True to resume a folder sampled with the same settings (OutputDirError when sampled with others)."""
    return _store(recipe).check_fingerprint(fingerprint(recipe), recipe.output_dir)


def sample_captions_for(recipe: ShapesRewardRecipe, index: int):
    """The captions of ``samples[index]`` (deterministic by seed and index)."""
    from smpo_cli.shapes.world import sample_captions, split_captions

    train, _ = split_captions(recipe.split_seed)
    return sample_captions(np.random.default_rng([recipe.seed, index]), recipe.samples[index].captions, pool=train)


def _sample(recipe: ShapesRewardRecipe, index: int, out: Path) -> tuple[list, np.ndarray]:
    from smpo_cli.generation.runner import resume_ok, run_generation
    from smpo_cli.shapes.experiment import _execute, read_images
    from smpo_cli.utils.atomic import write_text

    spec = recipe.samples[index]
    captions = sample_captions_for(recipe, index)
    folder = out / "samples" / f"m{index}"
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "captions.txt"
    write_text(prompts, "".join(c.text + "\n" for c in captions))
    data = {"stage": "generate", "seed": spec.seed, "device": recipe.device, "output_dir": str(folder / "generated"),
            "model": {"pretrained": spec.model, "dtype": "float32"}, "prompts": {"path": str(prompts)},
            "sampling": {"images_per_prompt": spec.images_per_caption, "num_inference_steps": recipe.num_inference_steps,
                         "guidance_scale": spec.guidance_scale, "batch_size": 64},
            "logging": {"progress": recipe.logging.progress}}  # fmt: skip
    _execute("generate", data, run_generation, resume_ok)
    return captions, read_images(folder / "generated", len(captions), spec.images_per_caption)


def voted_pairs(recipe: ShapesRewardRecipe, index: int, captions: list, images: np.ndarray) -> dict[str, Any]:
    """Every pair of samples of one caption, judged and voted on (arrays, one row per pair)."""
    from smpo_cli.shapes.annotators import DEFAULT_POPULATION
    from smpo_cli.shapes.judge import judge_batch

    k = recipe.samples[index].images_per_caption
    verdicts = judge_batch(images, [c for c in captions for _ in range(k)])
    ia, ib = zip(*[(i * k + a, i * k + b) for i in range(len(captions)) for a, b in itertools.combinations(range(k), 2)],
                 strict=True)  # fmt: skip
    ia, ib = np.array(ia), np.array(ib)
    labels = DEFAULT_POPULATION.label_pairs(np.random.default_rng([recipe.seed, 1000 + index]),
                                            [verdicts[i] for i in ia], [verdicts[i] for i in ib])  # fmt: skip
    return {
        "a": images[ia], "b": images[ib], "text": [captions[i // k].text for i in ia],
        "label": labels.labels.astype(np.float64), "true_p": labels.true_preference,
        "judge_a": labels.reward_a, "judge_b": labels.reward_b,
    }  # fmt: skip


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: (sum((p[k] for p in parts), []) if k == "text" else np.concatenate([p[k] for p in parts]))
            for k in parts[0]}  # fmt: skip


def _contrastive(recipe: ShapesRewardRecipe, out: Path, tokenizer, bank, train_world):
    """The contrastively pretrained CLIP, from ``contrastive/`` when a run with the same settings made it."""
    import torch
    from transformers import CLIPModel

    from smpo_cli.shapes import reward_model as rm
    from smpo_cli.shapes.world import make_dataset
    from smpo_cli.utils.atomic import atomic_path
    from smpo_cli.utils.progress import make_progress

    key = recipe.model_dump(mode="json", include={"seed", "split_seed", "renders", "net", "contrastive"})
    folder = out / "contrastive"
    if (folder / "smpo_contrastive.json").is_file():
        saved = json.loads((folder / "smpo_contrastive.json").read_text(encoding="utf-8"))
        if saved["key"] == key:
            return CLIPModel.from_pretrained(folder).eval(), saved["loss"]
    net, c = recipe.net, recipe.contrastive
    model = rm.build_reward_clip(tokenizer, width=net.width, layers=net.vision_layers, text_layers=net.text_layers,
                                 patch_size=net.patch_size, image_size=IMAGE_SIZE, seed=recipe.seed)  # fmt: skip
    renders = make_dataset(recipe.renders, seed=recipe.seed + 7, size=IMAGE_SIZE, pool=train_world)
    torch.manual_seed(recipe.seed)
    with make_progress() as progress:
        loss = rm.contrastive_pretrain(
            model, bank, renders.images, renders.captions, steps=c.steps, batch_size=c.batch_size, lr=c.lr,
            warmup=c.warmup_steps, seed=recipe.seed + 3, progress=progress)  # fmt: skip
    with atomic_path(folder) as tmp:  # an interrupted run keeps this phase
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "smpo_contrastive.json").write_text(json.dumps({"key": key, "loss": loss}) + "\n", encoding="utf-8")
    return model, loss


def run_shapes_reward(recipe: ShapesRewardRecipe) -> ShapesRewardResult:
    import torch
    from transformers import CLIPProcessor, CLIPTokenizer

    from smpo_cli.shapes import reward_model as rm
    from smpo_cli.shapes.base_model import write_world_tokenizer
    from smpo_cli.shapes.world import make_dataset, split_captions
    from smpo_cli.utils.atomic import atomic_path, write_json
    from smpo_cli.utils.progress import make_progress

    started = time.perf_counter()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _store(recipe).write_fingerprint(fingerprint(recipe))
    tokenizer = CLIPTokenizer.from_pretrained(write_world_tokenizer(out / "tokenizer"))
    bank = rm.TextBank(tokenizer)
    train_world, _ = split_captions(recipe.split_seed)
    model, contrastive_loss = _contrastive(recipe, out, tokenizer, bank, train_world)

    parts, sample_info = [], []
    for i, spec in enumerate(recipe.samples):
        captions, images = _sample(recipe, i, out)
        pairs = voted_pairs(recipe, i, captions, images)
        parts.append(pairs)
        sample_info.append({"model": spec.model, "captions": len(captions), "images": len(images),
                            "pairs": len(pairs["text"])})  # fmt: skip
    data = _concat(parts)
    texts = sorted(set(data["text"]))
    held = set(np.random.default_rng([recipe.seed, 2]).permutation(texts)[: max(1, round(recipe.heldout_fraction * len(texts)))])
    is_held = np.array([t in held for t in data["text"]])
    train_idx, held_idx = np.flatnonzero(~is_held), np.flatnonzero(is_held)
    pairs = rm.VotedPairs(data["a"], data["b"], data["text"], data["label"])
    size = IMAGE_SIZE
    v = recipe.votes
    torch.manual_seed(recipe.seed)
    with make_progress() as progress:
        vote_loss = rm.preference_finetune(
            model, bank, pairs.take(train_idx), steps=v.steps, batch_size=v.batch_size, lr=v.lr,
            warmup=v.warmup_steps, seed=recipe.seed + 4, progress=progress)  # fmt: skip

    held_pairs = pairs.take(held_idx)
    cos_a = rm.cosines(model, bank, held_pairs.images_a, held_pairs.texts)
    cos_b = rm.cosines(model, bank, held_pairs.images_b, held_pairs.texts)
    label, true_p = data["label"][held_idx], data["true_p"][held_idx]
    n = int(len(held_idx))
    accuracy = {
        "reward": rm.vote_accuracy(cos_a, cos_b, label),
        "judge": rm.vote_accuracy(data["judge_a"][held_idx], data["judge_b"][held_idx], label),
        "population": rm.vote_accuracy(true_p, 1 - true_p, label),
    }
    from smpo_cli.benchmark.metrics import wilson_interval

    vote_accuracy = {k: {"accuracy": a, "ci95": list(wilson_interval(a * n, n))} for k, a in accuracy.items()}
    vote_accuracy["pairs"] = n
    # how often each names the side the population prefers (a score tie counts half, as for votes)
    side = np.where(true_p > 0.5, 1.0, np.where(true_p < 0.5, 0.0, 0.5))
    agreement = {
        "reward": rm.vote_accuracy(cos_a, cos_b, side),
        "judge": rm.vote_accuracy(data["judge_a"][held_idx], data["judge_b"][held_idx], side),
        "pairs": int((side != 0.5).sum()),
    }
    fresh = make_dataset(2000, seed=recipe.seed + 8, size=size, pool=train_world)
    near = rm.near_miss_accuracy(model, bank, fresh.images, fresh.captions, seed=recipe.seed + 9)

    train_pairs = pairs.take(train_idx)
    all_cos = np.concatenate([rm.cosines(model, bank, train_pairs.images_a, train_pairs.texts),
                              rm.cosines(model, bank, train_pairs.images_b, train_pairs.texts)])  # fmt: skip
    cosine_range = [float(all_cos.min()), float(all_cos.max())]
    reward_dir = out / "reward"
    dtype = {"float16": torch.float16, "float32": torch.float32}[recipe.export_dtype]
    with atomic_path(reward_dir) as tmp:
        model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        CLIPProcessor(image_processor=rm.image_processor(size), tokenizer=tokenizer).save_pretrained(tmp)
        meta = {"name": "shapes-pickscore", "cosine_range": cosine_range,
                "cosine_range_note": "min and max cosine over the fine-tuning pairs' images (SmPO min-max normalisation)",
                "heldout_vote_accuracy": {k: vote_accuracy[k]["accuracy"] for k in accuracy}}  # fmt: skip
        (tmp / rm.REWARD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    result = ShapesRewardResult(
        output_dir=str(out), reward_dir=str(reward_dir), train_pairs=int(len(train_idx)), heldout_pairs=n,
        vote_accuracy=vote_accuracy, population_agreement=agreement, near_miss_accuracy=near,
        cosine_range=cosine_range, losses={"contrastive": contrastive_loss, "votes": vote_loss},
        parameters=int(sum(p.numel() for p in model.parameters())),
        seconds=round(time.perf_counter() - started, 1), samples=sample_info,
    )  # fmt: skip
    write_json(out / "summary.json", result.to_dict())
    return result
