"""``shapes-pickscore``: the shapes world's PickScore, trained the way PickScore was.

PickScore is a CLIP model, contrastively pretrained on image-caption pairs, then fine-tuned on human votes
between two images of one prompt: ``score = logit_scale * cos(text, image)`` and the loss is the cross-entropy
of the softmax over a pair's two scores against the vote (0.5/0.5 for a tie). Here, with the same pieces:

1. **contrastive pretraining** of a small transformers ``CLIPModel`` (ViT on 32x32 images, the world's
   tokenizer) on rendered scenes and their captions. Each image also meets a *near-miss* caption (one
   attribute changed: a colour, the colours' binding, the relation, the count or a shape) as an extra
   negative, so that the text tower cannot ignore the words preferences hinge on;
2. **preference fine-tuning** on pairs of base-model samples of one caption, each labelled by one sampled
   annotator's vote (``shapes.annotators``), as Pick-a-Pic's votes label its pairs;
3. **held-out vote accuracy** on pairs of captions kept out of fine-tuning, next to the judge's and the
   population's (the population's preferred side is the best any model can do on single votes);
4. a folder that ``load_reward("pickscore", folder)`` reads like the real checkpoint
   (``CLIPModel.save_pretrained`` + ``CLIPProcessor``) plus ``smpo_reward.json`` with the cosine range
   that SmPO's min-max normalisation uses (min and max over the fine-tuning images, as the official
   constants are for Pick-a-Pic).

Everything here is pure training code on arrays: the stage (``run_shapes_reward``) samples and labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from smpo_cli.shapes.world import (
    COLOR_NAMES,
    COUNTS,
    RELATIONS,
    SHAPES,
    Caption,
    ObjectSpec,
)

REWARD_CONFIG = "smpo_reward.json"
MAX_TEXT_TOKENS = 16


# ---------------------------------------------------------------------------------- near misses
def near_miss(caption: Caption, rng: np.random.Generator) -> Caption:
    """``caption`` with one attribute changed, chosen uniformly among those it has.

    colour (one object's colour to another unused colour), binding (two colours exchanged), relation
    (another relation), count (another count) or shape (one object's shape to another unused shape).
    """
    objs = list(caption.objects)
    kinds = ["shape"]
    coloured = [i for i, o in enumerate(objs) if o.color]
    if coloured:
        kinds.append("colour")
    if len(coloured) == 2:
        kinds.append("binding")
    if caption.relation:
        kinds.append("relation")
    if any(o.count > 1 for o in objs):
        kinds.append("count")
    kind = kinds[int(rng.integers(len(kinds)))]
    relation = caption.relation
    if kind == "colour":
        i = coloured[int(rng.integers(len(coloured)))]
        used = {o.color for o in objs}
        choices = [c for c in COLOR_NAMES if c not in used]
        objs[i] = ObjectSpec(objs[i].shape, choices[int(rng.integers(len(choices)))], objs[i].count)
    elif kind == "binding":
        a, b = objs
        objs = [ObjectSpec(a.shape, b.color, a.count), ObjectSpec(b.shape, a.color, b.count)]
    elif kind == "relation":
        choices = [r for r in RELATIONS if r != relation]
        relation = choices[int(rng.integers(len(choices)))]
    elif kind == "count":
        i = next(i for i, o in enumerate(objs) if o.count > 1)
        choices = [n for n in COUNTS if n != objs[i].count]
        objs[i] = ObjectSpec(objs[i].shape, objs[i].color, choices[int(rng.integers(len(choices)))])
    else:
        i = int(rng.integers(len(objs)))
        used = {o.shape for o in objs}
        choices = [s for s in SHAPES if s not in used]
        objs[i] = ObjectSpec(choices[int(rng.integers(len(choices)))], objs[i].color, objs[i].count)
    return Caption(caption.skill, tuple(objs), relation)


# ------------------------------------------------------------------------------------- the model
def build_reward_clip(tokenizer, *, width: int, layers: int, text_layers: int, patch_size: int, image_size: int,
                      seed: int):  # fmt: skip
    """A fresh, seeded ``CLIPModel`` of PickScore's architecture at the world's sizes."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    heads = max(1, width // 32)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=text_layers,
            num_attention_heads=heads, max_position_embeddings=MAX_TEXT_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=width,
        ),
        vision_config=dict(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
            image_size=image_size, patch_size=patch_size, projection_dim=width,
        ),
        projection_dim=width,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(cfg)


def image_processor(image_size: int):
    """The CLIPImageProcessor the saved model ships: a no-op resize/crop at ``image_size``, OpenAI mean/std."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def pixels(images: np.ndarray):
    """(n, H, W, 3) uint8 -> what the saved processor gives for images already at the model's size."""
    import torch

    from smpo_cli.rewards.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class TextBank:
    """Token ids of every distinct caption text, tokenised once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.rows: dict[str, int] = {}
        self.ids: list = []

    def encode(self, texts: Sequence[str]):
        import torch

        new = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if new:
            tok = self.tokenizer(new, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True,
                                 return_tensors="pt")  # fmt: skip
            for t, row in zip(new, tok.input_ids, strict=True):
                self.rows[t] = len(self.ids)
                self.ids.append(row)
        return torch.stack([self.ids[self.rows[t]] for t in texts])


def embed(model, px=None, ids=None):
    """L2-normalised projected embeddings (differentiable), normalised as ``rewards._hf_clip`` does at scoring."""
    import torch

    from smpo_cli.rewards.base import l2_normalize

    def unit(out):
        return l2_normalize(getattr(out, "pooler_output", out))

    img = unit(model.get_image_features(pixel_values=px)) if px is not None else None
    if ids is None:
        return img, None
    # the tokenizer pads with <|endoftext|>; CLIP pools at the first eos, so the mask changes nothing
    # beyond what scoring's padding=True mask does (tests/shapes pin that scores match load_reward's)
    mask = torch.ones_like(ids)
    return img, unit(model.get_text_features(input_ids=ids, attention_mask=mask))


def _optimise(model, loss_of_step, *, steps: int, lr: float, warmup: int, what: str, progress=None) -> float:
    """AdamW (weight decay 0.1), linear warm-up then cosine decay to 0, gradient clipping at 1; returns the mean
    of the last 50 losses. ``loss_of_step()`` draws its own batch and returns the loss."""
    import torch

    from smpo_cli.shapes.base_model import _lr_lambda

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps, 0.0))
    task = progress.add_task(f"shapes-pickscore: {what}", total=steps) if progress else None
    model.train()
    recent: list[float] = []
    for _ in range(steps):
        loss = loss_of_step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-50:]
        if progress:
            progress.update(task, advance=1, description=f"shapes-pickscore: {what} {np.mean(recent):.3f}")
    model.eval()
    return float(np.mean(recent))


def contrastive_pretrain(model, bank: TextBank, images: np.ndarray, captions: Sequence[Caption], *, steps: int,
                         batch_size: int, lr: float, warmup: int, seed: int, progress=None) -> float:  # fmt: skip
    """CLIP's symmetric InfoNCE with one near-miss caption per image as an extra negative; returns the last loss.

    Images of the same caption text in a batch are not counted as negatives of each other.
    """
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    texts = [c.text for c in captions]

    def step_loss():
        idx = rng.integers(0, len(images), batch_size)
        batch_texts = [texts[i] for i in idx]
        misses = [near_miss(captions[i], rng).text for i in idx]
        img, txt = embed(model, pixels(images[idx]), bank.encode(batch_texts + misses))
        scale = model.logit_scale.exp().clamp(max=100.0)
        same = torch.tensor([[a == b for b in batch_texts + misses] for a in batch_texts])
        own = torch.zeros_like(same)
        own[torch.arange(batch_size), torch.arange(batch_size)] = True
        i2t = (scale * img @ txt.T).masked_fill(same & ~own, float("-inf"))
        t2i = (scale * txt[:batch_size] @ img.T).masked_fill(same[:, :batch_size] & ~own[:, :batch_size],
                                                              float("-inf"))  # fmt: skip
        target = torch.arange(batch_size)
        return 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target))

    return _optimise(model, step_loss, steps=steps, lr=lr, warmup=warmup, what="contrastive", progress=progress)


@dataclass(frozen=True)
class VotedPairs:
    """Pairs of two images of one caption text and the vote: ``label`` 1 = image a preferred, 0.5 = tie."""

    images_a: np.ndarray
    images_b: np.ndarray
    texts: list[str]
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> VotedPairs:
        return VotedPairs(self.images_a[idx], self.images_b[idx], [self.texts[i] for i in idx], self.label[idx])


def preference_finetune(model, bank: TextBank, pairs: VotedPairs, *, steps: int, batch_size: int, lr: float,
                        warmup: int, seed: int, progress=None) -> float:  # fmt: skip
    """PickScore's objective: cross-entropy of softmax(scale * [cos_a, cos_b]) against (label, 1 - label)."""
    import torch

    rng = np.random.default_rng(seed)

    def step_loss():
        b = pairs.take(rng.integers(0, len(pairs), batch_size))
        img, txt = embed(model, pixels(np.concatenate([b.images_a, b.images_b])), bank.encode(b.texts))
        scale = model.logit_scale.exp().clamp(max=100.0)
        logits = scale * torch.stack([(img[:batch_size] * txt).sum(-1), (img[batch_size:] * txt).sum(-1)], dim=1)
        y = torch.from_numpy(b.label).float()
        return -(torch.stack([y, 1 - y], dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()

    return _optimise(model, step_loss, steps=steps, lr=lr, warmup=warmup, what="votes", progress=progress)


def cosines(model, bank: TextBank, images: np.ndarray, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
    """cos(text, image) per image (the ``cosine`` output of ``smpo score``)."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            img, txt = embed(model, pixels(images[s : s + batch_size]), bank.encode(texts[s : s + batch_size]))
            out.append((img * txt).sum(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def vote_accuracy(score_a: np.ndarray, score_b: np.ndarray, label: np.ndarray) -> float:
    """Share of votes (label 1 or 0) whose preferred image scores higher; an exact score tie counts half."""
    decided = label != 0.5
    diff = np.sign(np.asarray(score_a, dtype=np.float64) - np.asarray(score_b, dtype=np.float64))[decided]
    vote = np.where(label[decided] == 1, 1.0, -1.0)
    return float(np.mean(np.where(diff == 0, 0.5, (diff == vote).astype(float))))


def near_miss_accuracy(model, bank: TextBank, images: np.ndarray, captions: Sequence[Caption], seed: int) -> dict:
    """Per near-miss kind: how often an image's own caption scores above a near miss of it."""
    rng = np.random.default_rng(seed)
    misses = [near_miss(c, rng) for c in captions]
    own = cosines(model, bank, images, [c.text for c in captions])
    other = cosines(model, bank, images, [m.text for m in misses])
    kinds = [_miss_kind(c, m) for c, m in zip(captions, misses, strict=True)]
    out = {"all": float(np.mean(own > other))}
    for kind in sorted(set(kinds)):
        sel = np.array([k == kind for k in kinds])
        out[kind] = float(np.mean(own[sel] > other[sel]))
    return out


def _miss_kind(caption: Caption, miss: Caption) -> str:
    if caption.relation != miss.relation:
        return "relation"
    a, b = caption.objects, miss.objects
    if [o.shape for o in a] != [o.shape for o in b]:
        return "shape"
    if [o.count for o in a] != [o.count for o in b]:
        return "count"
    if len(a) == 2 and a[0].color == b[1].color and a[1].color == b[0].color:
        return "binding"
    return "colour"
