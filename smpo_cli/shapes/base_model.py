"""The shapes world's base model: a tiny text-to-image LDM in the real SD1.5 layout, pretrained on a CPU.

``run_pretrain(recipe)`` trains, from scratch and from a seed (so the command reproduces the shipped
weights up to floating-point nondeterminism of the CPU kernels):

1. the CLIP tokenizer of the world's vocabulary (every word one token; ``models.tiny.tokenizer_files``);
2. an ``AutoencoderKL`` (4x down-sampling, 4 latent channels) on rendered scenes: MSE + a tiny KL;
3. every image encoded once (posterior mean and std); ``scaling_factor`` = 1 / std of the means;
4. the ``CLIPTextModel``: either trained jointly with the UNet (``text_encoder.training: joint``; a frozen
   *random* one cannot tell colours apart), or (``contrastive``) first CLIP-pretrained on other renders with
   their true captions and then frozen, as SD1.5 keeps OpenAI's CLIP frozen. A jointly trained encoder
   merges words that the captions use interchangeably (the miscaptioned base's partner colours), and
   ``smpo train``, which keeps the text encoder frozen, then cannot teach the UNet to tell them apart;
5. the ``UNet2DConditionModel`` (with the text encoder when joint), epsilon objective, captions dropped with
   probability ``empty_prompt_prob`` for classifier-free guidance, AdamW with warm-up and cosine decay,
   gradient clipping, EMA weights;
6. a ``StableDiffusionPipeline`` (EMA weights, DDIM scheduler) saved with ``save_pretrained`` (safetensors),
   so it loads like any SD1.5 checkpoint.

Design from ../shared/shapes-feasibility.md (25 CPU-minutes give clean single shapes, right colours, mostly
right counts, weak positions: room to align).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smpo_cli.config.schema import ShapesPretrainRecipe
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

MODEL_MAX_LENGTH = 16  # the longest caption is far shorter


@dataclass
class PretrainResult:
    output_dir: str
    pipeline_dir: str
    images: int
    vae_steps: int
    unet_steps: int
    scaling_factor: float
    vae_mse: float
    final_loss: float
    text_encoder: str = "joint"
    text_encoder_loss: float | None = None
    word_separation: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_world_tokenizer(dest: Path) -> Path:
    from smpo_cli.models.tiny import tokenizer_files
    from smpo_cli.shapes.world import VOCABULARY

    dest.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(VOCABULARY).items():
        if name == "tokenizer_config.json":
            config = json.loads(text)
            config["model_max_length"] = MODEL_MAX_LENGTH
            text = json.dumps(config, indent=2) + "\n"
        (dest / name).write_text(text, encoding="utf-8")
    return dest


def build_components(recipe: ShapesPretrainRecipe, tokenizer) -> dict[str, Any]:
    """Fresh, seeded VAE, text encoder and UNet of the recipe's sizes."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    m = recipe.model
    levels = len(m.vae_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(m.vae_channels),
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=1, norm_num_groups=16, sample_size=recipe.data.size,
        )  # fmt: skip
        torch.manual_seed(recipe.seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=m.text_width, intermediate_size=4 * m.text_width,
            num_hidden_layers=m.text_layers, num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
            projection_dim=m.text_width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))  # fmt: skip
        torch.manual_seed(recipe.seed + 2)
        unet = UNet2DConditionModel(
            sample_size=recipe.data.size // 2 ** (levels - 1), in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=tuple(m.unet_channels), layers_per_block=1, cross_attention_dim=m.text_width,
            attention_head_dim=4, norm_num_groups=32,
        )  # fmt: skip
    return {"vae": vae, "text_encoder": text_encoder, "unet": unet}


def _lr_lambda(warmup: int, total: int, floor: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _to_tensor(images):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, images, recipe: ShapesPretrainRecipe, progress) -> float:
    """Reconstruction training; returns the mean MSE (on [-1, 1]) of the last 50 steps."""
    import torch

    cfg = recipe.vae
    gen = torch.Generator().manual_seed(recipe.seed + 10)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(1, cfg.steps, cfg.final_lr / cfg.lr))
    vae.train()
    task = progress.add_task("shapes base: VAE", total=cfg.steps)
    recent: list[float] = []
    for _step in range(cfg.steps):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x = _to_tensor(images[idx.numpy()])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        recent = (recent + [mse.item()])[-50:]
        progress.update(task, advance=1, description=f"shapes base: VAE mse {sum(recent) / len(recent):.4f}")
    vae.eval()
    return sum(recent) / len(recent)


def encode_all(vae, images, batch_size: int = 512):
    """Posterior means and stds of every image (the UNet loop then never runs the VAE)."""
    import torch

    means, stds = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            dist = vae.encode(_to_tensor(images[start : start + batch_size])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class _Ema:
    """EMA of parameters with the warm-up decay min(cap, (1 + s) / (10 + s))."""

    def __init__(self, modules, cap: float) -> None:
        import torch

        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.cap, self.step = cap, 0
        self._torch = torch

    def update(self) -> None:
        self.step += 1
        decay = min(self.cap, (1 + self.step) / (10 + self.step))
        with self._torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                s.lerp_(p.detach(), 1 - decay)

    def copy_to(self) -> None:
        with self._torch.no_grad():
            for s, p in zip(self.shadow, self.params, strict=True):
                p.copy_(s)


# words whose conditioning vectors a usable text encoder must keep apart: partner colours (what the miscaptioned
# base confuses), two unrelated colours, and the relations
SEPARATION_PAIRS = (
    ("a red circle", "an orange circle"),
    ("a blue square", "a purple square"),
    ("a green triangle", "a yellow triangle"),
    ("a red circle", "a blue circle"),
    ("a red circle left of a blue square", "a red circle right of a blue square"),
    ("a red circle above a blue square", "a red circle below a blue square"),
)


def word_separation(text_encoder, tokenizer) -> dict[str, float]:
    """Relative distance ||e(a) - e(b)|| / ||e(a)|| of the UNet's conditioning (last hidden state) per pair."""
    import torch

    out = {}
    with torch.inference_mode():
        for a, b in SEPARATION_PAIRS:
            ids = tokenizer([a, b], padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                            return_tensors="pt").input_ids  # fmt: skip
            e = text_encoder(ids).last_hidden_state.float()
            key = "/".join(w for w in a.split() if w not in b.split() and w not in ("a", "an"))
            key += "/" + "/".join(w for w in b.split() if w not in a.split() and w not in ("a", "an"))
            out[key] = round(float((e[0] - e[1]).norm() / e[0].norm()), 4)
    return out


def pretrain_text_encoder(text_encoder, tokenizer, recipe: ShapesPretrainRecipe, out: Path, progress) -> float:
    """CLIP-pretrain (``shapes.reward_model.contrastive_pretrain``) and copy the text tower into ``text_encoder``.

    The renders are their own (another seed) with true captions: the encoder never sees the UNet's captions,
    as OpenAI's CLIP never saw SD's. The text weights are kept in ``text_encoder/`` so a rerun skips this.
    """
    import torch
    from transformers import CLIPTextModel

    from smpo_cli.shapes import reward_model as rm
    from smpo_cli.shapes.world import make_dataset, split_captions
    from smpo_cli.utils.atomic import atomic_path

    cfg = recipe.text_encoder
    key = recipe.model_dump(mode="json", include={"seed", "data", "model", "text_encoder"})
    folder = out / "text_encoder"
    marker = folder / "smpo_text_encoder.json"
    if marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if saved["key"] == key:
            text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder).state_dict())
            return saved["loss"]
    clip = rm.build_reward_clip(
        tokenizer, width=recipe.model.text_width, layers=cfg.vision_layers, text_layers=recipe.model.text_layers,
        patch_size=cfg.patch_size, image_size=recipe.data.size, seed=recipe.seed + 40,
    )  # fmt: skip
    train_captions, _ = split_captions(recipe.data.split_seed)
    renders = make_dataset(recipe.data.images, seed=recipe.seed + 41, size=recipe.data.size, pool=train_captions)
    torch.manual_seed(recipe.seed + 42)
    loss = rm.contrastive_pretrain(
        clip, rm.TextBank(tokenizer), renders.images, renders.captions, steps=cfg.steps, batch_size=cfg.batch_size,
        lr=cfg.lr, warmup=cfg.warmup_steps, seed=recipe.seed + 43, progress=progress,
    )  # fmt: skip
    # transformers 5 flattens CLIPTextModel (no .text_model); CLIPModel keeps its tower under text_model
    text_encoder.load_state_dict(clip.text_model.state_dict())
    with atomic_path(folder) as tmp:
        text_encoder.save_pretrained(tmp, safe_serialization=True)
        (tmp / marker.name).write_text(json.dumps({"key": key, "loss": loss}) + "\n", encoding="utf-8")
    return loss


def train_unet(
    unet, text_encoder, tokenizer, latents, captions, recipe: ShapesPretrainRecipe, progress
) -> float:
    """Epsilon-objective training of the UNet (+ the text encoder when joint); EMA weights are copied in at the end."""
    import torch
    from diffusers import DDPMScheduler

    from smpo_cli.models.tiny import _scheduler_kwargs

    cfg = recipe.unet
    gen = torch.Generator().manual_seed(recipe.seed + 20)
    noise_sched = DDPMScheduler(**{k: v for k, v in _scheduler_kwargs().items() if k != "steps_offset"})
    abar = noise_sched.alphas_cumprod
    mean, std = latents
    tokens = tokenizer(list(captions) + [""], padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                       return_tensors="pt").input_ids  # fmt: skip
    empty = tokens[-1]
    joint = recipe.text_encoder.training == "joint"
    trained = [unet, text_encoder] if joint else [unet]
    text_encoder.requires_grad_(joint)
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(cfg.warmup_steps, cfg.steps, cfg.final_lr_fraction)
    )
    ema = _Ema(trained, cfg.ema_decay)
    scaling = recipe_scaling(latents)
    unet.train()
    text_encoder.train(joint)
    task = progress.add_task("shapes base: UNet", total=cfg.steps)
    recent: list[float] = []
    for _step in range(cfg.steps):
        idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        ids = tokens[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.empty_prompt_prob
        ids[drop] = empty
        t = torch.randint(0, len(abar), (cfg.batch_size,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        with torch.set_grad_enabled(joint):
            hidden = text_encoder(ids).last_hidden_state
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=hidden).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        ema.update()
        recent = (recent + [loss.item()])[-100:]
        progress.update(
            task, advance=1, description=f"shapes base: UNet loss {sum(recent) / len(recent):.4f}"
        )
    ema.copy_to()
    unet.eval()
    text_encoder.eval()
    return sum(recent) / len(recent)


def recipe_scaling(latents) -> float:
    """SD's ``scaling_factor``: 1 / std of the posterior means, so scaled latents have unit variance."""
    return float(1.0 / latents[0].std())


def training_data(recipe: ShapesPretrainRecipe):
    """(images, caption texts) the base model learns from: renders of training captions, ``colour_swap`` miscaptioned."""
    from smpo_cli.shapes.world import make_dataset, miscaption, split_captions

    # held-out captions (split_seed) stay unseen, so the testbed can measure generalisation
    train_captions, _ = split_captions(recipe.data.split_seed)
    data = make_dataset(recipe.data.images, seed=recipe.seed, size=recipe.data.size, pool=train_captions)
    # the images keep the true captions; only the text the model learns from is miscaptioned
    texts = [c.text for c in miscaption(data.captions, recipe.data.colour_swap, seed=recipe.seed + 30)]
    return data.images, texts


def run_pretrain(recipe: ShapesPretrainRecipe) -> PretrainResult:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from smpo_cli.models.tiny import _scheduler_kwargs
    from smpo_cli.utils.atomic import atomic_path, write_json
    from smpo_cli.utils.progress import make_progress

    started = time.perf_counter()
    out = Path(recipe.output_dir)
    torch.manual_seed(recipe.seed)
    images, captions = training_data(recipe)
    tok_dir = write_world_tokenizer(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    parts = build_components(recipe, tokenizer)
    with make_progress() as progress:
        text_loss = None
        if recipe.text_encoder.training == "contrastive":
            text_loss = pretrain_text_encoder(parts["text_encoder"], tokenizer, recipe, out, progress)
        vae_mse = train_vae(parts["vae"], images, recipe, progress)
        latents = encode_all(parts["vae"], images)
        scaling = recipe_scaling(latents)
        final_loss = train_unet(
            parts["unet"], parts["text_encoder"], tokenizer, latents, captions, recipe, progress
        )
    separation = word_separation(parts["text_encoder"], tokenizer)
    parts["vae"].register_to_config(scaling_factor=scaling)
    scheduler = DDIMScheduler(**_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(**parts, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[
        recipe.export_dtype
    ]
    for module in parts.values():
        torch.nn.Module.to(module, dtype)  # plain cast: nothing in these tiny models needs to stay float32
    pipeline_dir = out / "pipeline"
    with atomic_path(pipeline_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    result = PretrainResult(
        output_dir=str(out), pipeline_dir=str(pipeline_dir), images=len(images), vae_steps=recipe.vae.steps,
        unet_steps=recipe.unet.steps, scaling_factor=round(scaling, 5), vae_mse=round(vae_mse, 5),
        final_loss=round(final_loss, 5), text_encoder=recipe.text_encoder.training,
        text_encoder_loss=None if text_loss is None else round(text_loss, 5),
        word_separation=separation,
        parameters={k: sum(p.numel() for p in v.parameters()) for k, v in parts.items()},
        seconds=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    write_json(out / "summary.json", result.to_dict())
    return result
