"""``run_training(recipe)``: SmPO / Diffusion-DPO / SFT on accelerate.

One process on a CPU, 8 GPUs or several nodes are the same code: ``accelerate launch`` (or torchrun)
starts the processes, DDP averages gradients, the main process writes checkpoints, metrics and the
final model. A resumed run (``train.resume=auto``) continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from smpo_cli.config.schema import TrainRecipe
from smpo_cli.errors import DataError, SmpoError, UsageError
from smpo_cli.training import zero
from smpo_cli.training.batching import plan_batches
from smpo_cli.training.checkpoint import (
    check_resume_settings,
    load_checkpoint,
    resolve_resume,
    resume_settings,
    save_checkpoint,
)
from smpo_cli.training.sharding import (
    check_sharding,
    device_mesh,
    full_model_state,
    full_optimizer_state,
    load_any_optimizer_state,
    local_fraction,
    plain_unet,
    shard_unet,
)
from smpo_cli.training.step import STEP_METRICS
from smpo_cli.training.zero import require_deepspeed, zero_stage
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    output_dir: str
    method: str
    labels: str  # data.labels as used: reward | human
    label_column: str  # the column that chose each pair's winner (e.g. pickscore_winner, label_0)
    steps: int
    resumed_from: int
    final_loss: float | None
    pairs_per_second: float
    unet_calls_per_step: float
    skipped_pairs: int
    nonfinite_steps: int
    model_path: str
    ranks_in_sync: bool
    trainable_checksum: float
    seconds: float
    sharding: str = "none"  # none (DDP), fsdp, zero2 or zero3: how the UNet was split across the processes
    local_param_fraction: float = 1.0  # the share of the trained parameters the main process held
    reference_param_fraction: float | None = None  # the same for the frozen reference (None: no reference copy)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("metrics")
        return d


def _optimizer(recipe: TrainRecipe, params, lr: float):
    o = recipe.optim
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
    if o.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=o.weight_decay)  # fmt: skip
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError("optim.name=adamw8bit needs bitsandbytes", hint="pip install bitsandbytes (CUDA only)") from None
    return bnb.optim.AdamW8bit(params, lr=lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)


def _checksum(params) -> float:
    return float(sum(p.detach().double().sum() for p in params))


def run_training(recipe: TrainRecipe) -> TrainResult:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from smpo_cli.inversion.schedule import NoiseSchedule
    from smpo_cli.models import load_components
    from smpo_cli.training.data import PairExamples, PositionSampler, cache_for, collate, load_pair_table
    from smpo_cli.training.step import PairDraws, StepModels, make_grid, micro_batch_loss
    from smpo_cli.utils.progress import make_progress

    started = time.perf_counter()
    r, t = recipe, recipe.train
    out_dir = Path(r.output_dir)
    trackers = [x for x in r.logging.report_to if x != "jsonl"]
    launched_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if launched_deepspeed:
        # smpo runs DeepSpeed itself (smpo_cli.training.zero): accelerate only launches and makes the process group
        os.environ.pop("ACCELERATE_USE_DEEPSPEED")
    accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=r.device == "cpu",
                              log_with=trackers or None, project_dir=str(out_dir))  # fmt: skip
    device = accelerator.device
    world = accelerator.num_processes
    resume_from = resolve_resume(out_dir, t.resume)
    saved_state = json.loads((resume_from / "state.json").read_text()) if resume_from is not None else None
    split = plan_batches(r, world, saved_state)  # before any weight loads: a bad split fails at once
    kind = "DEEPSPEED" if launched_deepspeed else str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    shard_mode = check_sharding(r, world, kind)
    sharded = shard_mode == "fsdp"  # torch FSDP2
    stage = zero_stage(shard_mode)  # DeepSpeed ZeRO 2 / 3, or None
    if stage is not None:
        require_deepspeed()  # before any weight loads
    grad_accum, per_step_pairs = split.grad_accum_steps, split.pairs_per_step
    if saved_state and saved_state.get("processes") not in (None, world):
        logger.info("resuming a %s-process checkpoint on %d processes: grad_accum_steps %d keeps %d pairs per step",
                    saved_state["processes"], world, grad_accum, per_step_pairs)  # fmt: skip
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.mixed_precision, torch.float32)
    cache = cache_for(r)
    m = r.model
    comps = load_components(m.pretrained, family=m.family, vae=m.vae, unet=m.unet, config=m.config,
                            revision=m.revision, variant=m.variant,
                            dtype=m.dtype if m.dtype != "auto" else str(weight_dtype).removeprefix("torch."),
                            device=str(device))  # fmt: skip
    for module in (comps.vae, comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3):
        if module is not None:
            module.requires_grad_(False).eval()
    if comps.is_flow:  # SD3 / FLUX.1: the transformer is trained (smpo_cli.training.flow_step)
        from smpo_cli.training.flow_step import check_flow_recipe

        check_flow_recipe(r, comps.family)
        if shard_mode != "none":
            raise UsageError(f"train.sharding={shard_mode} is not available for {comps.family} models yet",
                             hint="use LoRA (train.lora_rank) with train.sharding=none")  # fmt: skip
    unet = comps.denoiser  # the UNet, or the SD3 / FLUX.1 transformer
    ref_unet = None
    if t.lora_rank is not None:
        from smpo_cli.training.lora import add_lora, default_targets

        unet.requires_grad_(False)
        add_lora(unet, rank=t.lora_rank, alpha=t.lora_alpha, target_modules=default_targets(comps.family), seed=r.seed)
        for p in unet.parameters():  # the adapters train in fp32 even over an fp16 base
            if p.requires_grad:
                p.data = p.data.float()
    else:
        if r.method.name != "sft":
            ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
        if next(unet.parameters()).dtype != torch.float32:
            unet.to(torch.float32)  # fp32 master weights; autocast does the rest
            if ref_unet is not None and t.mixed_precision == "no":
                # Without autocast the policy computes in fp32: a reference left in fp16/bf16 would give
                # different predictions from the same weights, so the DPO/SmPO margin would not start at 0
                # and every step would carry that rounding bias.
                ref_unet.to(torch.float32)
        unet.requires_grad_(True)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    ck = load_checkpoint(resume_from) if resume_from is not None else None
    if ck is not None:  # the weights go in before sharding: a checkpoint holds full tensors
        if t.lora_rank is not None:
            from smpo_cli.training.lora import load_lora_state_dict

            load_lora_state_dict(unet, ck["trainable"])
        else:
            unet.load_state_dict(ck["trainable"])
    unet_class, unet_config = type(unet), unet.config
    if sharded:
        mesh = device_mesh(device, world)
        shard_unet(unet, mesh)
        if ref_unet is not None:
            shard_unet(ref_unet, mesh)
    params = [p for p in unet.parameters() if p.requires_grad]
    lr = r.optim.lr * per_step_pairs if r.optim.scale_lr else r.optim.lr
    optimizer = _optimizer(r, params, lr)
    engine = None
    if stage is not None:  # the engine owns gradients, clipping and the partitioned optimiser state
        engine = zero.init_engine(unet, optimizer, stage, t.batch_size, grad_accum, r.optim.max_grad_norm, world)
        if ref_unet is not None:
            ref_unet = zero.init_reference(ref_unet, stage, t.batch_size, world)
        params = [p for p in engine.module.parameters() if p.requires_grad]
        optimizer = zero.inner_optimizer(engine)  # the scheduler drives its parameter groups
    scheduler = get_scheduler(r.optim.lr_scheduler, optimizer, num_warmup_steps=r.optim.warmup_steps,
                              num_training_steps=t.max_steps)  # fmt: skip
    start_step, positions_done, skipped_total, nonfinite = 0, 0, 0, 0
    if ck is not None:
        if engine is not None:
            zero.load_optimizer_state(engine, ck["optimizer"])
        else:
            load_any_optimizer_state(unet, optimizer, ck["optimizer"], sharded)
        scheduler.load_state_dict(ck["scheduler"])
        st = ck["state"]
        check_resume_settings(st.get("settings"), r, resume_from)
        start_step = st["step"]
        # pairs consumed in the data order (checkpoints before elastic resume counted micro-batches)
        positions_done = st.get("positions", st.get("micro_batches", 0) * t.batch_size)
        skipped_total, nonfinite = st.get("skipped_pairs", 0), st.get("nonfinite_steps", 0)
        logger.info("resuming from %s (step %d)", resume_from, start_step)
    if engine is not None:
        unet, raw_unet, held = engine, engine.module, zero.local_fraction(engine)
    else:
        if not sharded:  # FSDP2 syncs gradients itself: accelerate must not wrap the UNet (in DDP or its own FSDP)
            unet, optimizer = accelerator.prepare(unet, optimizer)
        raw_unet = accelerator.unwrap_model(unet)
        held = local_fraction(params)
    ref_held = None
    if ref_unet is not None:
        ref_held = zero.reference_fraction(ref_unet) if engine is not None else local_fraction(list(ref_unet.parameters()))
    schedule = None if comps.is_flow else NoiseSchedule.from_scheduler(comps.scheduler, comps.prediction_type)
    models = StepModels(r, comps, unet, raw_unet, ref_unet, schedule, grid=make_grid(r, schedule) if schedule else [],
                        cache_levels=cache.levels if cache is not None else [], autocast=accelerator.autocast)  # fmt: skip
    table = load_pair_table(r)
    sampler = PositionSampler(table, r.seed, t.batch_size, accelerator.process_index, world,
                              positions_done // t.batch_size)  # fmt: skip
    loader = torch.utils.data.DataLoader(PairExamples(r, table, cache), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=r.data.num_workers)  # fmt: skip
    batches = iter(loader)
    metrics_path = out_dir / METRICS
    if accelerator.is_main_process:
        kept = []
        if metrics_path.exists():  # a resumed run keeps the steps before its checkpoint
            kept = [x for x in metrics_path.read_text(errors="replace").splitlines() if _step_of(x) <= start_step]
        metrics_path.write_text("".join(k + "\n" for k in kept))
        if trackers:
            accelerator.init_trackers("smpo", config=r.model_dump(mode="json"))
    logger.info("%s on %d pairs (%s labels: %s): %d steps of %d pairs (%d x %d x %d processes), lr %.3g, %s",
                r.method.name, len(table.rows), table.labels, table.label_column, t.max_steps, per_step_pairs,
                t.batch_size, grad_accum, world, lr,
                f"LoRA rank {t.lora_rank}" if t.lora_rank else "full fine-tuning")  # fmt: skip
    history: list[dict[str, Any]] = []
    step = start_step
    t0 = time.perf_counter()
    pairs_done = 0
    from rich.progress import TextColumn

    with make_progress(TextColumn("{task.fields[live]}")) as progress:
        task = progress.add_task(f"train {r.method.name}", total=t.max_steps, completed=start_step, live="")
        while step < t.max_steps:
            tick = time.perf_counter()
            sums: dict[str, float] = {}
            bad = False
            pairs = skipped = calls = readable = 0
            reasons: list[str] = []
            for micro in range(grad_accum):
                batch = next(batches)
                positions_done += world * t.batch_size
                skipped += batch["skipped"]
                readable += batch["size"]
                reasons += batch.get("skip_reason", [])
                sync = micro == grad_accum - 1
                if sharded or engine is not None:
                    if sharded:
                        unet.set_requires_gradient_sync(sync)
                    ctx = contextlib.nullcontext()
                else:
                    ctx = contextlib.nullcontext() if sync or world == 1 else accelerator.no_sync(unet)
                with ctx:
                    if batch["size"] == 0:
                        if shard_mode != "none":  # FSDP / ZeRO collectives need every process in every forward
                            raise DataError(f"{r.data.path}: a micro-batch of step {step + 1} has no readable pair "
                                            f"on process {accelerator.process_index}; train.sharding={shard_mode} needs "
                                            "one on every process", hint="remove the unreadable pairs, or use "
                                            "train.sharding=none")  # fmt: skip
                        accelerator.backward(sum(p.sum() for p in params) * 0.0)  # keep DDP's collectives in step
                        continue
                    draws = PairDraws(r.seed, step, batch["position"].tolist())
                    loss, mets = micro_batch_loss(models, batch, draws, device)
                    if not torch.isfinite(loss):
                        bad = True
                        # FSDP / ZeRO: the backward runs (its reduce-scatters pair with the forward); the step is skipped
                        if engine is not None:
                            engine.backward(loss, scale_wrt_gas=False)
                        else:
                            accelerator.backward(loss if sharded else sum(p.sum() for p in params) * 0.0)
                        continue
                    # the sum of the micro-batch's pair losses over the global batch (DDP averages over processes):
                    # the step's gradient is the same however its pairs are split (a skipped pair counts 0)
                    if engine is not None:  # ZeRO averages over processes as DDP does; smpo scales for accumulation
                        engine.backward(loss * batch["size"] * world / per_step_pairs, scale_wrt_gas=False)
                    else:
                        accelerator.backward(loss * batch["size"] * world / per_step_pairs)
                pairs += batch["size"]
                calls += mets.pop("unet_calls")
                for k, v in mets.items():
                    sums[k] = sums.get(k, 0.0) + v * batch["size"]
            if accelerator.reduce(torch.tensor(float(readable), device=device), reduction="sum").item() == 0:
                # every pair of a whole step unreadable: the data is broken (e.g. image paths relative to the
                # wrong folder), and training on would silently leave the model unchanged
                raise DataError(
                    f"{r.data.path}: step {step + 1} found no readable pair ({skipped} skipped here); first: "
                    f"{reasons[0] if reasons else 'on another process'}",
                    hint="image paths are resolved relative to the pairs file's folder; check that the files exist",
                )
            bad_any = accelerator.reduce(torch.tensor(float(bad), device=device), reduction="sum").item() > 0
            if bad_any:
                if engine is not None:  # the non-finite gradients make ZeRO skip its update and clear them
                    engine.step()
                    if zero.step_applied(engine):
                        raise SmpoError("DeepSpeed applied a step with a non-finite loss", hint="report this with `smpo env`")
                else:
                    optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                logger.warning("non-finite loss at step %d: step skipped (%d so far, limit %d)", step + 1, nonfinite,
                               t.max_nonfinite_steps)  # fmt: skip
                if nonfinite > t.max_nonfinite_steps:
                    raise SmpoError(
                        f"{nonfinite} steps with a non-finite loss (train.max_nonfinite_steps={t.max_nonfinite_steps})",
                        hint="lower optim.lr, use bf16 instead of fp16, or check the data; the last good checkpoint "
                        "is kept in checkpoints/",
                    )
                continue
            grad_norm = None
            lr_used = scheduler.get_last_lr()[0]  # the lr of this step (warm-up starts at 0)
            if engine is not None:  # clips (gradient_clipping), steps and clears the gradients
                engine.step()
                grad_norm = zero.grad_norm(engine) if r.optim.max_grad_norm is not None else None
            elif r.optim.max_grad_norm is not None:
                if sharded:
                    norm = torch.nn.utils.clip_grad_norm_(params, r.optim.max_grad_norm)
                    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                else:
                    grad_norm = float(accelerator.clip_grad_norm_(params, r.optim.max_grad_norm))
            if engine is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            means, pairs, skipped, calls = _global_step_metrics(accelerator, sums, pairs, skipped, calls, device)
            skipped_total += skipped
            pairs_done += pairs
            row = {"step": step, **means, "grad_norm": grad_norm,
                   "lr": lr_used, "pairs": pairs, "pairs_per_s": pairs / (time.perf_counter() - tick),
                   "unet_calls": calls, "skipped_pairs": skipped, "nonfinite_steps": nonfinite}  # fmt: skip
            history.append(row)
            if accelerator.is_main_process and step % r.logging.log_every_steps == 0:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                if trackers:
                    accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
            progress.update(task, completed=step,
                            live=f"loss {row.get('loss', float('nan')):.4f} acc {row.get('implicit_acc', float('nan')):.2f} "
                                 f"{row['pairs_per_s']:.2f} pairs/s")  # fmt: skip
            every = t.checkpoint_every_steps
            if (every and step % every == 0) or step == t.max_steps:
                accelerator.wait_for_everyone()
                if engine is not None:  # collectives: every process gathers, the main process writes
                    main = accelerator.is_main_process
                    trainable, opt_state = zero.full_model_state(engine, main), zero.full_optimizer_state(engine, main)
                elif sharded:
                    trainable, opt_state = full_model_state(raw_unet), full_optimizer_state(raw_unet, optimizer)
                else:
                    trainable, opt_state = None, optimizer
                if accelerator.is_main_process:
                    if trainable is None:
                        trainable = _trainable_state(raw_unet, t.lora_rank is not None)
                    save_checkpoint(out_dir, step, trainable, opt_state,
                                    scheduler, {"positions": positions_done, "pairs_per_step": per_step_pairs,
                                                "processes": world, "skipped_pairs": skipped_total,
                                                "nonfinite_steps": nonfinite, "settings": resume_settings(r)},
                                    t.keep_checkpoints)  # fmt: skip
    seconds = time.perf_counter() - t0
    export_unet = raw_unet
    if sharded or engine is not None:  # one copy of the weights, split: gather it (collective) for the export
        full = full_model_state(raw_unet) if sharded else zero.full_model_state(engine, accelerator.is_main_process)
        export_unet = plain_unet(unet_class, unet_config, full) if accelerator.is_main_process else None
        checksum = _checksum(full.values()) if accelerator.is_main_process else 0.0
        in_sync = True
    else:
        checksum = _checksum(p for p in raw_unet.parameters() if p.requires_grad)
        sums_all = accelerator.gather(torch.tensor([checksum], dtype=torch.float64, device=device))
        in_sync = bool(torch.allclose(sums_all, sums_all[0].expand_as(sums_all), rtol=0, atol=0))
    if not in_sync:
        raise SmpoError(f"ranks ended with different weights (checksums {sums_all.tolist()})", hint="report this with `smpo env`")
    model_path = ""
    if accelerator.is_main_process:
        from smpo_cli.training.export import save_lora, save_pipeline

        if t.lora_rank is not None:
            model_path = str(save_lora(raw_unet, out_dir / "lora", comps.family))
        else:
            model_path = str(save_pipeline(comps, export_unet, out_dir / "pipeline"))
    accelerator.wait_for_everyone()
    if trackers:
        accelerator.end_training()
    n_steps = max(step - start_step, 1)
    return TrainResult(
        output_dir=str(out_dir), method=r.method.name, labels=table.labels, label_column=table.label_column,
        steps=step, resumed_from=start_step,
        final_loss=history[-1].get("loss") if history else None,
        pairs_per_second=round(pairs_done / max(seconds, 1e-9), 3),
        unet_calls_per_step=sum(h["unet_calls"] for h in history) / n_steps if history else 0.0,
        skipped_pairs=skipped_total, nonfinite_steps=nonfinite, model_path=model_path, ranks_in_sync=in_sync,
        sharding=shard_mode, local_param_fraction=round(held, 6),
        reference_param_fraction=None if ref_held is None else round(ref_held, 6),
        trainable_checksum=checksum, seconds=round(time.perf_counter() - started, 3), metrics=history,
    )  # fmt: skip


def _global_step_metrics(accelerator, sums: dict[str, float], pairs: int, skipped: int, calls: int, device):
    """The step's per-pair means over every process's pairs (not the main process's alone), and its totals of
    pairs, skipped pairs and UNet calls: what a run logs does not depend on how many processes made it."""
    unknown = set(sums) - set(STEP_METRICS)
    if unknown:
        raise SmpoError(f"step metrics {sorted(unknown)} are not in STEP_METRICS", hint="report this with `smpo env`")
    values = [pairs, skipped, calls, *(sums.get(k, 0.0) for k in STEP_METRICS), *(float(k in sums) for k in STEP_METRICS)]
    vec = torch.tensor(values, dtype=torch.float64, device=device)
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="sum")
    vec = vec.cpu().tolist()
    n = len(STEP_METRICS)
    total_pairs = int(vec[0])
    means = {k: vec[3 + i] / max(total_pairs, 1) for i, k in enumerate(STEP_METRICS) if vec[3 + n + i] > 0}
    return means, total_pairs, int(vec[1]), int(vec[2])


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; a torn line (a kill or a full disk mid-write) counts as after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _trainable_state(unet, lora: bool) -> dict[str, torch.Tensor]:
    if lora:
        from smpo_cli.training.lora import lora_state_dict

        return lora_state_dict(unet)
    return {k: v for k, v in unet.state_dict().items()}
