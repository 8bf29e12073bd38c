"""Reward models: one interface (:class:`~smpo_cli.rewards.base.RewardModel`), one file per model.

>>> from smpo_cli.rewards import load_reward
>>> rm = load_reward("pickscore", device="cuda", dtype="float16")  # doctest: +SKIP
>>> rm.score(images, prompts)["cosine"]                              # doctest: +SKIP

Registry (an allow-list; no dotted paths): name -> module, default weights, outputs.

=============  =====================================  ==========================  ===================
name           default source                         outputs (default first)     module
=============  =====================================  ==========================  ===================
pickscore      yuvalkirstain/PickScore_v1             score, cosine               pickscore.py
hpsv2          xswu/HPSv2 (HPS_v2.1_compressed.pt)    score, score_x100           hpsv2.py
hpsv3          MizzenAI/HPSv3 (HPSv3.safetensors)     score, sigma, log_sigma     hpsv3.py
imagereward    THUDM/ImageReward (ImageReward.pt)     score, raw                  imagereward.py
aesthetic      trl-lib/ddpo-aesthetic-predictor       score                       aesthetic.py
clip           openai/clip-vit-large-patch14          clip_score, cosine          clip.py
shapes-judge   (built in: no weights)                 score, correct              shapes_judge.py
=============  =====================================  ==========================  ===================

``path="shapes-pickscore"`` (with ``pickscore``) loads the shapes world's PickScore, shipped in the package.

Importing this package imports neither torch nor transformers nor open_clip: each loader imports
what it needs when called, so the command line stays fast.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smpo_cli.errors import UsageError

if TYPE_CHECKING:
    from smpo_cli.rewards.base import RewardModel


@dataclass(frozen=True)
class RewardSpec:
    name: str
    module: str
    default_source: str
    outputs: tuple[str, ...]
    summary: str


REWARDS: dict[str, RewardSpec] = {
    spec.name: spec
    for spec in (
        RewardSpec(
            "pickscore",
            "smpo_cli.rewards.pickscore",
            "yuvalkirstain/PickScore_v1",
            ("score", "cosine"),
            "PickScore_v1 (CLIP-H); score = logit_scale * cosine, cosine = raw (SmPO smoothing)",
        ),
        RewardSpec(
            "hpsv2",
            "smpo_cli.rewards.hpsv2",
            "xswu/HPSv2",
            ("score", "score_x100"),
            "HPSv2 / HPSv2.1 (open_clip ViT-H-14); variant=v2.0|v2.1 (default v2.1), antialias=false",
        ),
        RewardSpec(
            "hpsv3",
            "smpo_cli.rewards.hpsv3",
            "MizzenAI/HPSv3",
            ("score", "sigma", "log_sigma"),
            "HPSv3 (Qwen2-VL-7B + reward head); score = mu, sigma = exp(log_sigma); base=Qwen2-VL files",
        ),
        RewardSpec(
            "imagereward",
            "smpo_cli.rewards.imagereward",
            "THUDM/ImageReward",
            ("score", "raw"),
            "ImageReward-v1.0 (BLIP); score = (head - mean) / std",
        ),
        RewardSpec(
            "aesthetic",
            "smpo_cli.rewards.aesthetic",
            "trl-lib/ddpo-aesthetic-predictor",
            ("score",),
            "LAION improved aesthetic predictor (sac+logos+ava1) on CLIP ViT-L/14; prompt-free",
        ),
        RewardSpec(
            "clip",
            "smpo_cli.rewards.clip",
            "openai/clip-vit-large-patch14",
            ("clip_score", "cosine"),
            "CLIP score; clip_score = max(100 * cosine, 0) (torchmetrics), cosine = raw",
        ),
        RewardSpec(
            "shapes-judge",
            "smpo_cli.rewards.shapes_judge",
            "builtin",
            ("score", "correct"),
            "the shapes world's exact judge (no weights); score in [0, 1], correct = 1/0",
        ),
    )
}


def available_rewards() -> tuple[str, ...]:
    return tuple(REWARDS)


def get_spec(name: str) -> RewardSpec:
    key = str(name).strip().lower()
    if key not in REWARDS:
        import difflib

        close = difflib.get_close_matches(key, REWARDS, n=1)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(
            f"unknown reward model {name!r}", hint=f"{suggestion}choose one of: {', '.join(REWARDS)}"
        )
    return REWARDS[key]


def load_reward(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    **options: Any,
) -> RewardModel:
    """Load reward model ``name`` from ``path`` (a local file/folder or a hub id).

    ``path=None`` uses the official weights (``REWARDS[name].default_source``), taken from the
    local Hugging Face cache when present and otherwise downloaded; offline and not cached raises
    :class:`~smpo_cli.errors.AssetNotFoundError` with a one-line hint. ``options`` go to the model
    (e.g. ``variant="v2.0"`` and ``antialias=True`` for hpsv2, ``processor=`` for pickscore/clip,
    ``backbone=`` for aesthetic, ``tokenizer=`` for imagereward, ``base=`` for hpsv3, ``batch_size=`` for all).
    """
    spec = get_spec(name)
    source = os.fspath(path) if path is not None else spec.default_source
    from smpo_cli.models.shipped import shipped_reward_path

    shipped = shipped_reward_path(source)
    if shipped is not None:  # a reward model that ships inside the package (shapes-pickscore)
        family, folder = shipped
        if family != spec.name:
            raise UsageError(f"{source} is a {family} model, not {spec.name}", hint=f"use reward {family} with it")
        source = str(folder)
    model_cls = importlib.import_module(spec.module).load
    allowed = _options_of(model_cls)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UsageError(
            f"{spec.name}: unknown option(s) {', '.join(unknown)}",
            hint=f"{spec.name} takes: {', '.join(sorted(allowed))}",
        )
    return model_cls(source, device=device, dtype=dtype, **options)


def _options_of(model_cls: type) -> set[str]:
    """Keyword options of a reward class: its own ``__init__`` plus the base class's."""
    import inspect

    names: set[str] = set()
    for klass in model_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                names.add(p.name)
    return names - {"source", "version", "device", "dtype"}


def __getattr__(name: str) -> Any:  # lazy re-exports (keep `import smpo_cli.rewards` light)
    if name in ("RewardModel", "EmbeddingRewardModel", "to_rgb"):
        from smpo_cli.rewards import base

        return getattr(base, name)
    if name in ("build_tiny_reward", "tiny_reward_path"):
        from smpo_cli.rewards import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REWARDS",
    "RewardSpec",
    "available_rewards",
    "build_tiny_reward",
    "get_spec",
    "load_reward",
    "tiny_reward_path",
]
