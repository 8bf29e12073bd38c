"""Positive controls for fine-tuning the shapes model: can `smpo train` move it toward what its data shows?

Every arm fine-tunes ``shapes-sd15`` with the SFT loss through the real ``smpo train`` (same steps, batch,
learning rate with warm-up, 10% empty prompts as in pretraining), then samples the same evaluation captions
with the same seeds as the base model and lets the shapes judge read every image:

* ``renders``: fresh renders of the world (continued pretraining): must not lower accuracy;
* ``rs_cfg4``: rejection sampling, the base model's own samples at guidance 4 (the evaluation's guidance)
  that the judge finds correct;
* ``rs_cfg2``: the same at guidance 2 (closer to the model's conditional distribution);
* ``big_objects``: the quarter of the guidance-2 samples with the largest objects (any correctness): a
  shift the model can represent, so its object size must grow.

Differences from the base are paired by seed. ``--eval balanced`` (the default) scores as GenEval does: the
mean of the six skills' accuracies, each skill 256 images (every GenEval-form caption of a small skill with
many seeds; 64 captions of a large one), with a bootstrap stratified by skill (seeds resampled where the
evaluation holds every caption of a skill, captions where it holds a sample). ``--eval legacy`` is the earlier
image-mean over 192 captions x 4, 70% colour attribution. ``--rs-balance`` repeats each skill's correct samples
(at most 8x) so that every skill reaches the largest skill's count.

    python bench/shapes_controls.py -o runs/shapes-controls          # about 20 minutes on 2 CPU cores
    python bench/shapes_controls.py -o runs/shapes-controls-3e-5 --lr 3e-5
    python bench/shapes_controls.py -o /tmp/c --quick --json         # the plumbing in about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from smpo_cli.shapes.evaluation import balanced_eval, eval_groups_of

SKILL_WEIGHTS = {"color_attr": 0.35, "position": 0.25, "counting": 0.2, "two_object": 0.1, "colors": 0.05,
                 "single_object": 0.05}  # fmt: skip
ARMS = ("renders", "rs_cfg4", "rs_cfg2", "big_objects")


def smpo(*args: str, threads: int = 1) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "smpo_cli", "-q", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")


def generate(model: str, captions: Path, out: Path, per_caption: int, seed: int, guidance: float,
             overwrite: bool = False, extra: list[str] | None = None) -> None:  # fmt: skip
    # without overwrite a rerun resumes a finished folder instead of sampling it again; a retrained model's
    # folder must be overwritten (same path, other weights)
    smpo("generate", "-m", model, "-p", str(captions), "-o", str(out), *(["--overwrite"] if overwrite else []), "model.dtype=float32",
         "device=cpu", "logging.progress=false", f"seed={seed}", f"sampling.images_per_prompt={per_caption}",
         "sampling.num_inference_steps=20", f"sampling.guidance_scale={guidance}", "sampling.batch_size=64", *(extra or []))  # fmt: skip


def judged(folder: Path, captions: list, per_caption: int) -> list:
    from smpo_cli.shapes.experiment import read_images
    from smpo_cli.shapes.judge import judge_batch

    images = read_images(folder, len(captions), per_caption)
    return judge_batch(images, [c for c in captions for _ in range(per_caption)])


def write_captions(path: Path, captions: list) -> Path:
    path.write_text("".join(c.text + "\n" for c in captions))
    return path


def sft_rows(paths: list[str], prompts: list[str]) -> list[dict]:
    return [{"image_0": p, "image_1": p, "prompt": t, "sft_winner": 0, "sft_p": 1.0, "smpo_row": i}
            for i, (p, t) in enumerate(zip(paths, prompts, strict=True))]  # fmt: skip


def balanced_repeats(keep: list[int], skills: list[str], max_repeat: int = 8) -> list[int]:
    """``keep`` with each skill's rows repeated so that it approaches the largest skill's count."""
    by_skill: dict[str, list[int]] = {}
    for j in keep:
        by_skill.setdefault(skills[j], []).append(j)
    target = max(len(rows) for rows in by_skill.values())
    out = []
    for rows in by_skill.values():
        out += rows * min(max_repeat, max(1, round(target / len(rows))))
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output-dir", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, measures nothing")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (pretraining ended at 6e-5)")
    ap.add_argument("--base", default="shapes-sd15", help="base model (shapes-sd15 or a smpo shapes pretrain pipeline)")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per arm (batch 32)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="lr warm-up steps (default: steps // 6)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--uniform-skills", action="store_true",
                    help="sample the pool's captions with uniform skills (default: weighted toward binding and position)")
    ap.add_argument("--eval", choices=("balanced", "legacy"), default="balanced",
                    help="balanced: GenEval's mean over skills, 256 images each; legacy: image mean, 192 captions x 4")
    ap.add_argument("--rs-balance", action="store_true",
                    help="repeat the rare skills' correct samples (at most 8x) so that every skill counts alike")
    ap.add_argument("--pool-captions", type=int, default=512, help="training captions sampled for the rejection-sampling pool")
    ap.add_argument("--pool-images", type=int, default=8, help="samples per pool caption (best-of-N: the judge keeps the correct ones)")
    ap.add_argument("--skills", default=None,
                    help="the pool's skill weights, e.g. colors=0.5,counting=0.25,color_attr=0.25 (overrides the default)")
    args = ap.parse_args()
    from PIL import Image

    from smpo_cli.benchmark.metrics import paired_bootstrap, paired_bootstrap_task_mean
    from smpo_cli.shapes.world import make_dataset, sample_captions, split_captions

    q = args.quick
    pool_captions, per_pool, eval_n, steps = (16, 4, 24, 4) if q else (args.pool_captions, args.pool_images, 192, args.steps)
    arms = tuple(a for a in args.arms.split(",") if a)
    if unknown := sorted(set(arms) - set(ARMS)):
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; choose from {ARMS}")
    base = args.base
    out = args.output_dir.resolve()  # the pairs files name images by absolute path
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, _ = split_captions(0)
    rng = np.random.default_rng(5)
    weights = None if args.uniform_skills else SKILL_WEIGHTS
    if args.skills:
        weights = {k: float(v) for k, v in (item.split("=") for item in args.skills.split(","))}
    pool = sample_captions(rng, pool_captions, pool=train, skill_weights=weights)
    geneval = [c for c in train if c.geneval_form]
    fixed = [c for c in geneval if c.skill != "color_attr"]
    binding = [c for c in geneval if c.skill == "color_attr"]
    evals = (fixed + [binding[i] for i in rng.permutation(len(binding))])[:eval_n]
    pool_file = write_captions(out / "pool.txt", pool)
    if args.eval == "balanced":
        evals, eval_groups, per_eval = balanced_eval(geneval, 8 if q else 256, 4 if q else 64), None, 1
        eval_groups = eval_groups_of(evals, geneval)
        eval_file, eval_name = write_captions(out / "eval_balanced.txt", evals), "eval_balanced"
    else:
        per_eval, eval_name = 4, "eval"
        eval_groups = np.repeat(np.arange(len(evals)), 4)
        eval_file = write_captions(out / "eval.txt", evals)

    # samples of the base model (two guidance scales) and its evaluation images, two processes at a time
    jobs = [(base, eval_file, out / f"{eval_name}_base", per_eval, 1000, 4.0)]
    jobs += [(base, pool_file, out / f"pool_cfg{g}", per_pool, 11, float(g)) for g in (4, 2)
             if f"rs_cfg{g}" in arms or (g == 2 and "big_objects" in arms)]  # fmt: skip
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(lambda j: generate(*j), jobs))

    data: dict[str, list[dict]] = {}
    if "renders" in arms:
        renders = make_dataset(8 * per_pool * pool_captions // 2, seed=777, pool=train)
        (out / "renders").mkdir(exist_ok=True)
        paths = []
        for i, image in enumerate(renders.images):
            paths.append(str(out / "renders" / f"{i:05d}.png"))
            Image.fromarray(image).save(paths[-1])
        data["renders"] = sft_rows(paths, renders.texts)
    for guidance in (4, 2):
        folder = out / f"pool_cfg{guidance}"
        if not folder.is_dir():
            continue
        verdicts = judged(folder, pool, per_pool)
        names = [str(folder / "images" / f"{i:05d}_{k:02d}.png") for i in range(len(pool)) for k in range(per_pool)]
        texts = [c.text for c in pool for _ in range(per_pool)]
        keep = [j for j, v in enumerate(verdicts) if v.correct]
        if args.rs_balance:
            keep = balanced_repeats(keep, [c.skill for c in pool for _ in range(per_pool)])
        data[f"rs_cfg{guidance}"] = sft_rows([names[j] for j in keep], [texts[j] for j in keep])
        if guidance == 2:
            size = np.array([v.object_size for v in verdicts])
            big = np.flatnonzero(size >= np.quantile(size, 0.75))
            data["big_objects"] = sft_rows([names[j] for j in big], [texts[j] for j in big])
    for arm, rows in data.items():
        (out / f"{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, steps // 6)

    def run_arm(arm: str) -> None:
        marker = out / arm / "done.json"  # a rerun with the same settings keeps a finished arm's model
        settings = {"base": base, "lr": args.lr, "steps": steps, "rows": len(data[arm]), "warmup": warmup}
        if marker.is_file() and json.loads(marker.read_text()) == settings:
            generate(str(out / arm / "train" / "pipeline"), eval_file, out / arm / eval_name, per_eval, 1000, 4.0)
            return
        smpo("train", "--recipe", "tiny_dpo_cpu", "-o", str(out / arm / "train"), "--overwrite",
             f"model.pretrained={base}", f"data.path={out / f'{arm}.jsonl'}", "method.name=sft",
             "train.grad_accum_steps=1", "train.checkpoint_every_steps=null", "optim.weight_decay=0.0", "data.reward=sft", "data.labels=reward", "data.resolution=32", "data.num_workers=0",
             "data.empty_prompt_prob=0.1", "model.dtype=float32", "device=cpu", "inversion.source=none",
             f"optim.lr={args.lr}", "optim.scale_lr=false", "optim.lr_scheduler=constant_with_warmup",
             f"optim.warmup_steps={warmup}", "train.batch_size=32", f"train.max_steps={steps}",
             "logging.progress=false")  # fmt: skip
        generate(str(out / arm / "train" / "pipeline"), eval_file, out / arm / eval_name, per_eval, 1000, 4.0,
                 overwrite=True)  # fmt: skip
        marker.write_text(json.dumps(settings))

    with ThreadPoolExecutor(2) as ex:
        list(ex.map(run_arm, arms))

    groups = eval_groups
    skills = np.array([c.skill for c in evals for _ in range(per_eval)])
    base = judged(out / f"{eval_name}_base", evals, per_eval)
    base_ok = np.array([v.correct for v in base], dtype=float)
    base_size = np.array([v.object_size for v in base])
    result = {"base": args.base, "eval": args.eval, "rs_balance": args.rs_balance, "eval_images": int(base_ok.size), "steps": steps, "lr": args.lr, "base_accuracy": float(base_ok.mean()),
              "base_object_size": float(base_size.mean()), "arms": {}}  # fmt: skip
    for arm in arms:
        v = judged(out / arm / eval_name, evals, per_eval)
        ok = np.array([x.correct for x in v], dtype=float)
        size = np.array([x.object_size for x in v])
        result["arms"][arm] = {
            "train_images": len(data[arm]),
            "accuracy": float(ok.mean()),
            "accuracy_change": (paired_bootstrap_task_mean(ok, base_ok, skills, groups) if args.eval == "balanced"
                                else paired_bootstrap(ok, base_ok, groups)),
            "object_size_change": paired_bootstrap(size, base_size, groups),
            "skills": {s: [float(base_ok[skills == s].mean()), float(ok[skills == s].mean())] for s in sorted(set(skills))},
        }
    if args.eval == "balanced":
        result["base_accuracy"] = float(np.mean([base_ok[skills == s].mean() for s in sorted(set(skills))]))
        for r in result["arms"].values():
            r["accuracy"] = r["accuracy_change"]["model"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['eval_images']} evaluation images per model; base accuracy {result['base_accuracy']:.1%}, "
          f"object size {result['base_object_size']:.3f}; {steps} steps x 32 images per arm; {result['seconds']:.0f} s")  # fmt: skip
    print(f"{'arm':12} {'images':>6} {'accuracy':>8} {'change, pts [95% CI]':>24} {'object size change [95% CI]':>30}")
    for arm, r in result["arms"].items():
        a, s = r["accuracy_change"], r["object_size_change"]
        print(f"{arm:12} {r['train_images']:>6} {r['accuracy']:>8.1%} "
              f"{100 * a['mean']:>+8.1f} [{100 * a['ci95'][0]:+.1f}, {100 * a['ci95'][1]:+.1f}]"
              f"{s['mean']:>+15.3f} [{s['ci95'][0]:+.3f}, {s['ci95'][1]:+.3f}]")  # fmt: skip
    names = sorted(next(iter(result["arms"].values()))["skills"]) if result["arms"] else []
    print(f"{'accuracy by skill':17}" + "".join(f"{n:>15}" for n in names))
    print(f"{'base':17}" + "".join(f"{next(iter(result['arms'].values()))['skills'][n][0]:>15.1%}" for n in names))
    for arm, r in result["arms"].items():
        print(f"{arm:17}" + "".join(f"{r['skills'][n][1]:>15.1%}" for n in names))


if __name__ == "__main__":
    main()
