"""Models whose weights ship inside the package, addressed by name like a hub id.

``shapes-sd15``: the shapes testbed's base model (SD1.5 layout, 32x32 images, float16 safetensors),
made by ``smpo shapes pretrain --recipe shapes_base_cpu`` (see the README's shapes testbed section).

``shapes-sd15-miscaptioned``: the same world and sizes, pretrained with 60% of captions naming every colour
by its partner (``smpo shapes pretrain --recipe shapes_base_miscaptioned_cpu``): the testbed's misaligned base.

``shapes-sd15-miscaptioned-clip``: miscaptioned in the same way, but its text encoder was CLIP-pretrained on
true captions and frozen while the UNet trained (``--recipe shapes_base_miscaptioned_clip_cpu``), as SD1.5 keeps
OpenAI's CLIP frozen: the base whose colours fine-tuning the UNet can correct.

``shapes-pickscore``: the shapes world's PickScore (a ``pickscore`` reward model folder), made by
``smpo shapes reward --recipe shapes_pickscore_cpu``.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_MODELS: dict[str, Path] = {
    "shapes-sd15": ASSETS / "shapes-sd15",
    "shapes-sd15-miscaptioned": ASSETS / "shapes-sd15-miscaptioned",
    "shapes-sd15-miscaptioned-clip": ASSETS / "shapes-sd15-miscaptioned-clip",
}
# reward model name -> (registry family, folder)
SHIPPED_REWARDS: dict[str, tuple[str, Path]] = {"shapes-pickscore": ("pickscore", ASSETS / "shapes-pickscore")}


def shipped_model_path(name: object) -> Path | None:
    """The folder of shipped model ``name``; None when ``name`` is not a shipped model's name."""
    return SHIPPED_MODELS.get(name) if isinstance(name, str) else None


def shipped_reward_path(name: object) -> tuple[str, Path] | None:
    """(reward family, folder) of shipped reward model ``name``; None when it is not a shipped reward's name."""
    return SHIPPED_REWARDS.get(name) if isinstance(name, str) else None
