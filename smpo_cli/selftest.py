"""End-to-end check of an installation on the embedded tiny models.

For each family: materialise the tiny pipeline in the real diffusers format, load it back through
the same loader a real checkpoint takes, and generate an image in a few denoising steps. It runs on
a CPU in seconds and needs no network; ``smpo selftest`` is the README's first command.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

FAMILIES = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl"}


@dataclass
class SelftestRow:
    family: str
    model: str
    model_dir: str
    unet_params: int
    load_seconds: float
    generate_seconds: float
    image: str
    image_size: tuple[int, int]
    deterministic: bool


@dataclass
class SelftestResult:
    rows: list[SelftestRow] = field(default_factory=list)
    device: str = "cpu"

    def to_dict(self) -> dict:
        return {"device": self.device, "rows": [asdict(r) for r in self.rows]}


def run_selftest(
    output_dir: str | Path,
    families: tuple[str, ...] = ("sd15", "sdxl"),
    steps: int = 2,
    device: str = "auto",
    seed: int = 0,
) -> SelftestResult:
    """Materialise, load and sample each tiny family; write one PNG per family to ``output_dir``."""
    import torch

    from smpo_cli.models import load_components, materialize_tiny
    from smpo_cli.utils.atomic import atomic_path

    output_dir = Path(output_dir)
    result = SelftestResult()
    for family in families:
        name = FAMILIES[family]
        folder = materialize_tiny(name)
        start = time.perf_counter()
        comps = load_components(str(folder), device=device, dtype="float32")
        load_s = time.perf_counter() - start
        result.device = str(comps.device)
        pipe = comps.pipeline()
        prompt = "a red circle above a blue square"

        def sample(seed_: int, pipe=pipe, prompt=prompt):
            generator = torch.Generator(device="cpu").manual_seed(seed_)
            return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="pil").images[0]

        start = time.perf_counter()
        image = sample(seed)
        gen_s = time.perf_counter() - start
        again = sample(seed)
        deterministic = list(image.getdata()) == list(again.getdata())
        dest = output_dir / f"{name}.png"
        with atomic_path(dest, suffix=".png") as tmp:
            image.save(tmp, format="PNG")
        row = SelftestRow(
            family=family,
            model=name,
            model_dir=str(folder),
            unet_params=sum(p.numel() for p in comps.unet.parameters()),
            load_seconds=round(load_s, 3),
            generate_seconds=round(gen_s, 3),
            image=str(dest),
            image_size=image.size,
            deterministic=deterministic,
        )
        logger.info("%s: loaded in %.2fs, %d-step sample in %.2fs -> %s", name, load_s, steps, gen_s, dest)
        result.rows.append(row)
    return result
