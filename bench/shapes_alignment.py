"""SmPO vs Diffusion-DPO on the miscaptioned shapes model (frozen CLIP text encoder), with pairs made by `smpo pairs`
and a learned reward.

1. ``smpo pairs``: ``images`` samples per training caption from ``shapes-sd15-miscaptioned-clip`` (captions
   with uniform skills) at ``--pairs-guidance`` (default 2: samples at the evaluation's guidance 4 teach the
   guided distribution as the conditional one, bench/shapes_controls.py), scored by ``shapes-pickscore`` (the
   learned reward, its own cosine range), best vs worst;
2. each pair also gets one simulated annotator's vote (``shapes.annotators``, read off the judge), the
   "human label" Diffusion-DPO trains on, written as the ``votes_winner`` / ``votes_p`` columns;
3. ``smpo train`` for each arm of ``--arms``, same pairs, steps, batch and learning rate: ``smpo_inv``
   (shapes-pickscore's smoothed p, trained from the ReNoise inversion cache ``smpo invert`` builds),
   ``smpo`` (the same p, random noise), ``smpo_binary`` (the same winner, p = 1), ``smpo_official`` (the same
   p, x_t from the official code's inversion: online by the policy on its 5-step grid, with its noise-level
   mismatch), ``dpo`` (the votes) and ``sft_votes`` (SFT on the voted winners), with the paper's SD1.5 temperatures (SmPO beta 2000 and gamma 10, DPO beta 5000); ``--seed`` trains another seed
   on the same pairs and evaluation;
4. every model samples the same evaluation captions with the same seeds (``--eval balanced``: GenEval's mean
   over six skills, 256 images each); the judge reads every image; differences from the base and between arms
   are paired by seed, with 95% bootstrap intervals stratified by skill. ``--pool-seeds 0,1,2`` pools the
   finished seeds into one table.

    python bench/shapes_alignment.py -o runs/shapes-alignment --arms smpo_inv,dpo --steps 800       # about 25-50 minutes on 2 CPU cores
    python bench/shapes_alignment.py -o runs/shapes-alignment --arms smpo_inv,dpo --steps 800 --seed 1
    python bench/shapes_alignment.py -o runs/shapes-alignment --pool-seeds 0,1
    python bench/shapes_alignment.py -o /tmp/a --quick --json          # the plumbing in about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_controls import generate, judged, smpo, write_captions  # noqa: E402

from smpo_cli.shapes.evaluation import balanced_eval, eval_groups_of  # noqa: E402

BASE = "shapes-sd15-miscaptioned-clip"  # partners stay apart in its frozen text encoder (README)
ARMS = {  # name: (method, data.reward, binary labels, beta, x_t): the paper's SD1.5 temperatures (SmPO gamma 10)
    "smpo_inv": ("smpo", "pickscore", False, 2000.0, "cache"),  # smpo's ReNoise inversion, from `smpo invert`'s cache
    "smpo": ("smpo", "pickscore", False, 2000.0, "noise"),
    "smpo_binary": ("smpo", "pickscore", True, 2000.0, "noise"),
    "dpo": ("dpo", "votes", False, 5000.0, "noise"),
    "sft_votes": ("sft", "votes", False, None, "noise"),  # SFT on the voted winners (no temperature)
    # the official code's inversion: online by the policy, its 5-step SD1.5 grid and its timestep handling
    # (diffusers 0.20.0, as pinned: inverts to the grid level at or above t, the noise-level mismatch)
    "smpo_official": ("smpo", "pickscore", False, 2000.0, "official"),
}
X_T = {"cache": None, "noise": ["inversion.source=none"],
       "official": ["inversion.source=online", "inversion.timestep_mode=official", "inversion.model=policy",
                    "inversion.num_steps=5", "inversion.renoise_iterations=1", "inversion.average_window=2"]}  # fmt: skip
COMPARISONS = (("smpo_inv", "dpo"), ("smpo", "dpo"), ("smpo_inv", "smpo"), ("smpo", "smpo_binary"), ("smpo_inv", "sft_votes"),
               ("dpo", "sft_votes"), ("smpo_inv", "smpo_official"), ("smpo_official", "dpo"))


def invert_pairs(base: str, out: Path) -> None:
    """The ReNoise inversion cache of every pair image on a 10-level grid (the paper's SDXL grid), as `smpo invert`
    builds it for a real run; a finished cache is resumed, not rebuilt."""
    smpo("invert", "--recipe", "renoise_sdxl_cache", "-o", str(out / "cache"), f"model.pretrained={base}", "~model.vae",
         "model.dtype=float32", "device=cpu", f"data.path={out / 'pairs'}", "data.resolution=32", "data.num_workers=0",
         "inversion.batch_size=64", "logging.progress=false")  # fmt: skip


def train_arm(out: Path, folder: Path, arm: str, *, base: str, lr: float, steps: int, seed: int,
              beta: float | None = None, checkpoint_every: int | None = None) -> None:
    """``smpo train`` of one arm on the pairs in ``out`` (16 pairs a step, constant lr after steps/8 of warm-up)
    into ``folder``; ``beta`` overrides the arm's temperature, ``checkpoint_every`` keeps every checkpoint."""
    method, reward, binary, arm_beta, x_t = ARMS[arm]
    beta = arm_beta if beta is None else beta
    inversion = X_T[x_t] or ["inversion.source=cache", f"inversion.cache_path={out / 'cache'}"]
    checkpoints = (["train.checkpoint_every_steps=null"] if checkpoint_every is None else
                   [f"train.checkpoint_every_steps={checkpoint_every}", f"train.keep_checkpoints={max(1, steps // checkpoint_every)}"])  # fmt: skip
    smpo("train", "--recipe", "tiny_dpo_cpu", "-o", str(folder), "--overwrite",
         f"model.pretrained={base}", f"data.path={out / 'pairs'}", f"method.name={method}",
         f"method.binary_labels={str(binary).lower()}", *([f"method.beta={beta}"] if beta else []), f"data.reward={reward}",
         "data.labels=reward",  # the winner column named by data.reward (votes for DPO and SFT: the human label)
         "train.grad_accum_steps=1", *checkpoints, "optim.weight_decay=0.0",
         "data.resolution=32", "data.num_workers=0", "data.empty_prompt_prob=0.1", "model.dtype=float32",
         "device=cpu", *inversion, f"optim.lr={lr}", "optim.scale_lr=false", f"seed={seed}",
         "optim.lr_scheduler=constant_with_warmup", f"optim.warmup_steps={max(1, steps // 8)}",
         "train.batch_size=16", f"train.max_steps={steps}", "logging.progress=false")  # fmt: skip


def prepare_pairs(out: Path, base: str, pool: Path, n_caps: int, images: int, guidance: float) -> dict:
    """``smpo pairs`` on the captions in ``pool`` plus one vote per pair; the pairs of a finished run with the
    same settings are reused by other seeds, arms and the grid. Returns the pairs' settings (their key)."""
    key = {"base": base, "captions": n_caps, "images": images, "guidance": guidance}
    stats_file = out / "pairs_stats.json"
    if stats_file.is_file() and json.loads(stats_file.read_text())["key"] == key:
        return key
    smpo("pairs", "--recipe", "pairs_tiny_cpu", "-o", str(out / "pairs"), "--overwrite", f"model.pretrained={base}",
         f"prompts.path={pool}", "~prompts.limit", f"sampling.images_per_prompt={images}",
         f"sampling.guidance_scale={guidance}", "sampling.batch_size=64", "logging.progress=false")  # fmt: skip
    stats_file.write_text(json.dumps({"key": key, "stats": add_votes(out / "pairs", seed=21)}))
    return key


def add_votes(pairs_dir: Path, seed: int) -> dict:
    """One sampled annotator's vote per pair (the human label), as votes_winner / votes_p columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from smpo_cli.shapes.annotators import DEFAULT_POPULATION
    from smpo_cli.shapes.judge import judge_batch
    from smpo_cli.shapes.world import parse_caption

    path = pairs_dir / "pairs.parquet"
    table = pq.read_table(path)
    captions = [parse_caption(t) for t in table.column("prompt").to_pylist()]
    read = lambda col: np.stack([np.asarray(Image.open(pairs_dir / f).convert("RGB")) for f in table.column(col).to_pylist()])  # noqa: E731
    va, vb = judge_batch(read("image_0"), captions), judge_batch(read("image_1"), captions)
    labels = DEFAULT_POPULATION.label_pairs(np.random.default_rng([seed, 3]), va, vb)
    votes_winner = np.where(labels.labels == 1, 0, 1).astype(np.int8)
    for name, values in (("votes_winner", votes_winner), ("votes_p", np.ones(len(votes_winner))),
                         ("true_p0", labels.true_preference)):  # fmt: skip
        table = table.append_column(name, pa.array(values))
    pq.write_table(table, path)
    reward_winner = table.column("pickscore_winner").to_numpy()
    true_winner = np.where(labels.true_preference >= 0.5, 0, 1)
    judge_gap = np.array([a.score - b.score for a, b in zip(va, vb, strict=True)])
    decided = judge_gap != 0
    return {"pairs": len(votes_winner), "judge_ties": float(np.mean(~decided)),
            "reward_agrees_with_population": float(np.mean(reward_winner == true_winner)),
            "votes_agree_with_population": float(np.mean(votes_winner == true_winner)),
            "reward_agrees_with_judge_when_decided": float(((reward_winner == 0) == (judge_gap > 0))[decided].mean())
            if decided.any() else float("nan")}  # fmt: skip


def pool_seeds(out: Path, seeds: list[int]) -> dict:
    """Every arm finished for all ``seeds``: each image's correctness averaged over the training seeds, then the
    GenEval-balanced paired bootstrap (stratified by skill) of arm - base and of the comparisons. The interval
    covers the evaluation's sampling noise with the seeds' mean as the model; the per-seed changes show the
    spread between training runs."""
    from smpo_cli.benchmark.metrics import paired_bootstrap_task_mean
    from smpo_cli.shapes.world import split_captions

    train, _ = split_captions(0)
    geneval = [c for c in train if c.geneval_form]
    evals = balanced_eval(geneval, 256, 64)
    groups, skills = eval_groups_of(evals, geneval), np.array([c.skill for c in evals])
    base = np.array([v.correct for v in judged(out / "eval_balanced_base", evals, 1)], dtype=float)
    folder = lambda arm, seed: out / (arm if seed == 0 else f"{arm}-s{seed}") / "eval_balanced"  # noqa: E731
    arms = [a for a in ARMS if all((folder(a, s) / "images").is_dir() for s in seeds)]
    per_seed = {a: [np.array([v.correct for v in judged(folder(a, s), evals, 1)], dtype=float) for s in seeds] for a in arms}
    mean = {a: np.mean(v, axis=0) for a, v in per_seed.items()}
    score = lambda ok: float(np.mean([ok[skills == s].mean() for s in sorted(set(skills))]))  # noqa: E731
    result = {"seeds": seeds, "eval_images": int(base.size), "base_accuracy": score(base), "arms": {}, "comparisons": {}}
    for a in arms:
        result["arms"][a] = {"accuracy": score(mean[a]), "change": paired_bootstrap_task_mean(mean[a], base, skills, groups),
                             "per_seed_change": [score(x) - score(base) for x in per_seed[a]],
                             "skills": {s: float(mean[a][skills == s].mean()) for s in sorted(set(skills))}}  # fmt: skip
    for a, b in COMPARISONS:
        if a in mean and b in mean:
            result["comparisons"][f"{a} - {b}"] = {**paired_bootstrap_task_mean(mean[a], mean[b], skills, groups),
                                                   "per_seed": [score(x) - score(y) for x, y in zip(per_seed[a], per_seed[b], strict=True)]}  # fmt: skip
    result["base_skills"] = {s: float(base[skills == s].mean()) for s in sorted(set(skills))}
    (out / f"results-pooled-{'-'.join(map(str, seeds))}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_pooled(r: dict) -> str:
    ci = lambda d: f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"  # noqa: E731
    seeds = lambda xs: ", ".join(f"{100 * x:+.1f}" for x in xs)  # noqa: E731
    lines = [f"seeds {r['seeds']}: base {r['base_accuracy']:.1%} on {r['eval_images']} images (GenEval-balanced)"]
    for arm, a in r["arms"].items():
        lines.append(f"{arm:12} {a['accuracy']:>7.1%}  change {ci(a['change'])}  per seed {seeds(a['per_seed_change'])}")
    for pair, d in r["comparisons"].items():
        lines.append(f"{pair:24} {ci(d)}  per seed {seeds(d['per_seed'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output-dir", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, measures nothing")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--lr", type=float, default=5e-5, help="learning rate (constant after warm-up)")
    ap.add_argument("--steps", type=int, default=400, help="optimiser steps per arm")
    ap.add_argument("--captions", type=int, default=768, help="training captions sampled for pairs")
    ap.add_argument("--images", type=int, default=4, help="samples per caption (best vs worst)")
    ap.add_argument("--pairs-guidance", type=float, default=2.0,
                    help="guidance of the pair samples (the controls: samples at the evaluation's guidance 4 teach the "
                         "guided distribution as the conditional one)")
    ap.add_argument("--arms", default="smpo,smpo_binary,dpo", help=f"comma-separated subset of {','.join(ARMS)}")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the pairs and the evaluation stay the same)")
    ap.add_argument("--workers", type=int, default=2, help="arms trained at a time (one thread each)")
    ap.add_argument("--eval", choices=("balanced", "legacy"), default="balanced",
                    help="balanced: GenEval's mean over skills, 256 images each; legacy: image mean, captions x 4")
    ap.add_argument("--eval-captions", type=int, default=384, help="legacy evaluation captions (x 4 images)")
    ap.add_argument("--pool-seeds", default=None,
                    help="e.g. 0,1,2: no training; pool the finished seeds' evaluations (balanced) into one table")
    args = ap.parse_args()
    if args.pool_seeds:
        pooled = pool_seeds(args.output_dir.resolve(), [int(x) for x in args.pool_seeds.split(",")])
        print(json.dumps(pooled) if args.json else format_pooled(pooled))
        return
    from smpo_cli.benchmark.metrics import paired_bootstrap, paired_bootstrap_task_mean
    from smpo_cli.shapes.world import sample_captions, split_captions

    arms = tuple(a for a in args.arms.split(",") if a)
    if unknown := sorted(set(arms) - set(ARMS)):
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; choose from {','.join(ARMS)}")
    q = args.quick
    n_caps, eval_n, steps = (16, 24, 3) if q else (args.captions, args.eval_captions, args.steps)
    out = args.output_dir.resolve()  # the pairs files name images by absolute path
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, _ = split_captions(0)
    rng = np.random.default_rng(21)
    pool = write_captions(out / "pool.txt", sample_captions(rng, n_caps, pool=train))
    geneval = [c for c in train if c.geneval_form]
    if args.eval == "balanced":
        evals, per_eval = balanced_eval(geneval, 8 if q else 256, 4 if q else 64), 1
        groups, eval_name = eval_groups_of(evals, geneval), "eval_balanced"
    else:
        evals, per_eval, eval_name = sample_captions(np.random.default_rng(22), eval_n, pool=geneval), 4, "eval"
        groups = np.repeat(np.arange(len(evals)), 4)
    eval_file = write_captions(out / f"{eval_name}.txt", evals)

    with ThreadPoolExecutor(2) as ex:
        jobs = [ex.submit(prepare_pairs, out, args.base, pool, n_caps, args.images, args.pairs_guidance),
                ex.submit(generate, args.base, eval_file, out / f"{eval_name}_base", per_eval, 1000, 4.0)]  # fmt: skip
        pairs_key = jobs[0].result()
        jobs[1].result()
    pair_stats = json.loads((out / "pairs_stats.json").read_text())["stats"]
    summary = json.loads((out / "pairs" / "summary.json").read_text())["summary"]["pickscore"]
    if any(ARMS[a][4] == "cache" for a in arms):
        invert_pairs(args.base, out)

    def arm_dir(arm: str) -> Path:
        return out / (arm if args.seed == 0 else f"{arm}-s{args.seed}")

    def run_arm(arm: str) -> None:
        folder = arm_dir(arm)
        marker = folder / "done.json"  # a rerun with the same settings keeps a finished arm's model
        settings = {"pairs": pairs_key, "lr": args.lr, "steps": steps, "seed": args.seed}
        if not (marker.is_file() and json.loads(marker.read_text()) == settings):
            train_arm(out, folder / "train", arm, base=args.base, lr=args.lr, steps=steps, seed=args.seed)
            generate(str(folder / "train" / "pipeline"), eval_file, folder / eval_name, per_eval, 1000, 4.0, overwrite=True)
            marker.write_text(json.dumps(settings))

    with ThreadPoolExecutor(args.workers) as ex:
        list(ex.map(run_arm, arms))

    skills = np.array([c.skill for c in evals for _ in range(per_eval)])
    base_ok = np.array([v.correct for v in judged(out / f"{eval_name}_base", evals, per_eval)], dtype=float)
    oks = {arm: np.array([v.correct for v in judged(arm_dir(arm) / eval_name, evals, per_eval)], dtype=float) for arm in arms}

    def diff(a: np.ndarray, b: np.ndarray) -> dict:
        if args.eval == "balanced":
            return paired_bootstrap_task_mean(a, b, skills, groups)
        return paired_bootstrap(a, b, groups)

    def score(ok: np.ndarray) -> float:
        return float(np.mean([ok[skills == s].mean() for s in sorted(set(skills))])) if args.eval == "balanced" else float(ok.mean())

    result = {"base": args.base, "eval": args.eval, "eval_images": int(base_ok.size), "steps": steps, "batch_pairs": 16,
              "lr": args.lr, "seed": args.seed, "pairs_guidance": args.pairs_guidance,
              "betas": {a: ARMS[a][3] for a in arms}, "pairs": pair_stats, "pair_summary": summary, "base_accuracy": score(base_ok),
              "base_skills": {s: float(base_ok[skills == s].mean()) for s in sorted(set(skills))}, "arms": {}}  # fmt: skip
    for arm, ok in oks.items():
        result["arms"][arm] = {"accuracy": score(ok), "change": diff(ok, base_ok),
                               "skills": {s: float(ok[skills == s].mean()) for s in sorted(set(skills))}}  # fmt: skip
    result["comparisons"] = {f"{a} - {b}": diff(oks[a], oks[b]) for a, b in COMPARISONS if a in oks and b in oks}
    result["seconds"] = round(time.perf_counter() - started, 1)
    name = "results.json" if args.seed == 0 else f"results-s{args.seed}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    ci = lambda d: f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"  # noqa: E731
    print(f"{args.base}: base {result['base_accuracy']:.1%} on {result['eval_images']} images ({args.eval}); {pair_stats['pairs']} pairs "
          f"at guidance {args.pairs_guidance:g} (judge ties {pair_stats['judge_ties']:.0%}; reward agrees with the population "
          f"{pair_stats['reward_agrees_with_population']:.0%}, votes {pair_stats['votes_agree_with_population']:.0%}); "
          f"{steps} steps x 16 pairs, lr {args.lr:g}, seed {args.seed}; {result['seconds']:.0f} s")  # fmt: skip
    for arm, r in result["arms"].items():
        print(f"{arm:12} {r['accuracy']:>7.1%}  change {ci(r['change'])}  " + "  ".join(f"{s} {v:.1%}" for s, v in r["skills"].items()))
    for pair, d in result["comparisons"].items():
        print(f"{pair:24} {ci(d)}")


if __name__ == "__main__":
    main()
