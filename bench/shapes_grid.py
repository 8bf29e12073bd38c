"""Each method's learning rate (and temperature) picked on a validation split at equal budget, then the chosen
settings run with 3 seeds on the test evaluation: the fair SmPO vs Diffusion-DPO vs SFT comparison of the shapes
testbed (bench/shapes_alignment.py makes the pairs, the votes and the inversion cache, and is reused here).

1. the grid: every point of ``GRID`` is trained with seed 0 on the same pairs for ``--steps`` steps of 16 pairs,
   keeping a checkpoint every quarter of the budget;
2. validation: every final model samples the *validation* captions (GenEval-balanced, 128 images per skill, seed
   2000; colour attribution uses captions the test evaluation does not, the other skills have 3-24 captions in
   the whole world, so there only the seeds differ); each method keeps the point with the best validation score;
3. curves: the chosen points' intermediate checkpoints sample the validation captions too; each evaluated model
   also reports its mean ``shapes-pickscore`` reward and its weights' distance from the base (over-optimisation
   shows as reward rising while the judge's accuracy falls);
4. test: the chosen settings are trained with seeds 1 and 2 (seed 0 is the grid's run) and every model samples
   the test evaluation of bench/shapes_alignment.py (1,536 images, seed 1000, the same as its base). Changes from
   the base and between methods are paired by seed, pooled over the 3 training seeds, with 95% bootstrap
   intervals stratified by skill; the per-seed changes show the spread between training runs;
5. edge checks (``EDGE_CHECKS``): where a choice lands on the grid's edge, the next point out is validated and
   published, never chosen;
6. ``--pool-run DIR``: a finished ``smpo shapes run`` folder (its own draw of the pairs, the same test images) is
   pooled with the test seeds of smpo_inv and dpo, with a t-interval over the runs as well.

    python bench/shapes_grid.py -o runs/shapes/alignment-clip-g2          # about 100 minutes on 2 CPU cores
    python bench/shapes_grid.py -o /tmp/g --quick --json                  # the plumbing in a few minutes
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_alignment import ARMS, BASE, invert_pairs, prepare_pairs, train_arm  # noqa: E402
from shapes_controls import generate, judged, write_captions  # noqa: E402

from smpo_cli.shapes.evaluation import balanced_eval, balanced_score, eval_groups_of, paired_change  # noqa: E402

GRID = {  # arm: (lr, beta) points; the centres are bench/shapes_alignment.py's settings (the paper's SD1.5 betas)
    "smpo_inv": [(5e-5, 2000.0), (2.5e-5, 2000.0), (1e-4, 2000.0), (5e-5, 1000.0), (5e-5, 4000.0)],
    "dpo": [(5e-5, 5000.0), (2.5e-5, 5000.0), (1e-4, 5000.0), (5e-5, 2500.0), (5e-5, 10000.0)],
    "sft_votes": [(5e-5, None), (2.5e-5, None), (1e-4, None)],
}
# points past the grid's edge where the choice landed on it: validated and published, never chosen (a post-hoc
# check that the optimum does not lie beyond the grid, which would have changed the choice)
EDGE_CHECKS = {"smpo_inv": [(5e-5, 500.0)]}
COMPARISONS = (("smpo_inv", "dpo"), ("smpo_inv", "sft_votes"), ("dpo", "sft_votes"))
TEST_SEEDS = (0, 1, 2)


def point_name(arm: str, lr: float, beta: float | None) -> str:
    return f"{arm}-lr{lr:g}" + ("" if beta is None else f"-b{beta:g}")


def validation_eval(geneval: list, test: list, images_per_skill: int) -> list:
    """GenEval-balanced validation captions: a skill's captions that the test evaluation leaves out where it
    leaves out at least 16 (colour attribution), else all of them (the seeds differ from the test's)."""
    from smpo_cli.shapes.world import SKILLS

    in_test = {c.text for c in test}
    out = []
    for skill in SKILLS:
        captions = [c for c in geneval if c.skill == skill]
        unseen = [c for c in captions if c.text not in in_test]
        captions = unseen if len(unseen) >= 16 else captions
        if len(captions) > images_per_skill:
            captions = [captions[i] for i in np.linspace(0, len(captions) - 1, images_per_skill).round().astype(int)]
        out += [captions[i % len(captions)] for i in range(images_per_skill)]
    return out


def unet_distance(unet_file: Path, base_unet: dict) -> float:
    """L2 distance of a UNet's weights from the base's, over every tensor."""
    from safetensors.torch import load_file

    tuned = load_file(unet_file)
    return float(sum(((tuned[k].double() - v.double()) ** 2).sum() for k, v in base_unet.items()) ** 0.5)


@functools.cache
def shapes_pickscore():
    """The learned reward, loaded once for every curve point."""
    from smpo_cli.rewards import load_reward

    return load_reward("pickscore", "shapes-pickscore")


def mean_reward(folder: Path, captions: list) -> float:
    """Mean shapes-pickscore of a sample folder's images against their captions (the reward the methods see)."""
    from PIL import Image

    from smpo_cli.shapes.experiment import read_images

    reward = shapes_pickscore()
    images = [Image.fromarray(a) for a in read_images(folder, len(captions), 1)]
    return float(reward.score(images, [c.text for c in captions])["score"].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output-dir", type=Path, required=True, help="bench/shapes_alignment.py's folder (or a new one)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing, measures nothing")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--base", default=BASE)
    ap.add_argument("--steps", type=int, default=800, help="optimiser steps of every run (the equal budget)")
    ap.add_argument("--captions", type=int, default=768, help="training captions of the pairs")
    ap.add_argument("--images", type=int, default=4, help="samples per caption (best vs worst)")
    ap.add_argument("--pairs-guidance", type=float, default=2.0)
    ap.add_argument("--arms", default=",".join(GRID), help=f"comma-separated subset of {','.join(GRID)}")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--pool-run", type=Path, default=None,
                    help="a finished `smpo shapes run` folder with the same evaluation (its arms smpo and dpo, a second "
                         "draw of the pairs): its seeds are pooled with the test seeds of smpo_inv and dpo")  # fmt: skip
    args = ap.parse_args()
    from smpo_cli.benchmark.metrics import paired_bootstrap_task_mean
    from smpo_cli.shapes.world import sample_captions, split_captions

    arms = [a for a in args.arms.split(",") if a]
    if unknown := sorted(set(arms) - set(GRID)):
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; choose from {','.join(GRID)}")
    q = args.quick
    n_caps, steps = (16, 4) if q else (args.captions, args.steps)
    test_per_skill, val_per_skill = (8, 8) if q else (256, 128)
    quarter = max(1, steps // 4)
    out = args.output_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    grid_dir = out / "grid"
    grid_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    train, _ = split_captions(0)
    pool = write_captions(out / "pool.txt", sample_captions(np.random.default_rng(21), n_caps, pool=train))
    geneval = [c for c in train if c.geneval_form]
    tests = balanced_eval(geneval, test_per_skill, 4 if q else 64)  # bench/shapes_alignment.py's evaluation
    vals = validation_eval(geneval, tests, val_per_skill)
    test_file, val_file = write_captions(out / "eval_balanced.txt", tests), write_captions(grid_dir / "validation.txt", vals)

    with ThreadPoolExecutor(2) as ex:
        jobs = [ex.submit(prepare_pairs, out, args.base, pool, n_caps, args.images, args.pairs_guidance),
                ex.submit(generate, args.base, val_file, grid_dir / "val_base", 1, 2000, 4.0),
                ex.submit(generate, args.base, test_file, out / "eval_balanced_base", 1, 1000, 4.0)]  # fmt: skip
        pairs_key = jobs[0].result()
        [j.result() for j in jobs[1:]]
    if any(ARMS[a][4] == "cache" for a in arms):
        invert_pairs(args.base, out)

    def sample(folder: Path, captions: Path, seed: int, model: Path, unet: Path | None = None) -> None:
        if (folder / "summary.json").is_file():  # finished earlier (a rerun resumes the grid)
            return
        extra = [] if unet is None else [f"model.unet={unet}"]
        generate(str(model), captions, folder, 1, seed, 4.0, overwrite=True, extra=extra)

    def run_point(arm: str, lr: float, beta: float | None, seed: int, evals: tuple[str, ...]) -> Path:
        """Train (unless finished with the same settings) and sample ``evals`` (val, test, curve)."""
        folder = grid_dir / (point_name(arm, lr, beta) + ("" if seed == 0 else f"-s{seed}"))
        marker = folder / "done.json"
        settings = {"pairs": pairs_key, "lr": lr, "beta": beta, "steps": steps, "seed": seed}
        legacy = out / f"{arm}-s{seed}"  # bench/shapes_alignment.py's run of the same settings and seed
        if (seed and "test" in evals and beta == ARMS[arm][3] and (legacy / "eval_balanced" / "summary.json").is_file()
                and json.loads((legacy / "done.json").read_text()) == {"pairs": pairs_key, "lr": lr, "steps": steps, "seed": seed}):
            if not (folder / "test" / "summary.json").is_file():
                shutil.copytree(legacy / "eval_balanced", folder / "test", dirs_exist_ok=True)
            return folder
        if not (marker.is_file() and json.loads(marker.read_text()) == settings):
            shutil.rmtree(folder, ignore_errors=True)
            train_arm(out, folder / "train", arm, base=args.base, lr=lr, beta=beta, steps=steps, seed=seed,
                      checkpoint_every=quarter if seed == 0 else None)  # fmt: skip
            marker.write_text(json.dumps(settings))
        pipeline = folder / "train" / "pipeline"
        if "val" in evals:
            sample(folder / "val", val_file, 2000, pipeline)
        if "test" in evals:
            sample(folder / "test", test_file, 1000, pipeline)
        if "curve" in evals:
            for k in range(1, steps // quarter):
                ckpt = folder / "train" / "checkpoints" / f"step-{k * quarter:06d}" / "trainable.safetensors"
                sample(folder / f"val-{k * quarter}", val_file, 2000, Path(args.base), ckpt)
        return folder

    val_skills, test_skills = np.array([c.skill for c in vals]), np.array([c.skill for c in tests])
    val_groups, test_groups = eval_groups_of(vals, geneval), eval_groups_of(tests, geneval)
    correct = lambda folder, caps: np.array([v.correct for v in judged(folder, caps, 1)], dtype=float)  # noqa: E731
    score = balanced_score
    val_base, test_base = correct(grid_dir / "val_base", vals), correct(out / "eval_balanced_base", tests)
    chosen: dict[str, tuple[float, float | None]] = {}
    grid_rows: dict[str, list[dict]] = {}
    lock = threading.Lock()

    with ThreadPoolExecutor(args.workers) as runs:
        def search(arm: str) -> None:  # a coordinator thread per arm: the grid, then that arm's test seeds
            points = GRID[arm][:2] if q else GRID[arm]
            folders = [f.result() for f in [runs.submit(run_point, arm, lr, b, 0, ("val",)) for lr, b in points]]
            rows = [{"lr": lr, "beta": b, "val": score(correct(f / "val", vals), val_skills),
                     "change": paired_bootstrap_task_mean(correct(f / "val", vals), val_base, val_skills, val_groups)}
                    for (lr, b), f in zip(points, folders, strict=True)]  # fmt: skip
            best = max(range(len(rows)), key=lambda i: rows[i]["val"])
            edges = [] if q else EDGE_CHECKS.get(arm, [])
            edge_folders = [f.result() for f in [runs.submit(run_point, arm, lr, b, 0, ("val",)) for lr, b in edges]]
            rows += [{"lr": lr, "beta": b, "edge_check": True, "val": score(correct(f / "val", vals), val_skills),
                      "change": paired_bootstrap_task_mean(correct(f / "val", vals), val_base, val_skills, val_groups)}
                     for (lr, b), f in zip(edges, edge_folders, strict=True)]  # fmt: skip
            with lock:
                grid_rows[arm], chosen[arm] = rows, points[best]
            lr, b = points[best]
            [f.result() for f in [runs.submit(run_point, arm, lr, b, s, ("test", "curve") if s == 0 else ("test",))
                                  for s in TEST_SEEDS]]  # fmt: skip

        with ThreadPoolExecutor(len(arms)) as coordinators:
            [c.result() for c in [coordinators.submit(search, a) for a in arms]]

    from safetensors.torch import load_file

    from smpo_cli.models.shipped import shipped_model_path

    base_dir = Path(args.base) if Path(args.base).is_dir() else shipped_model_path(args.base)
    base_unet = load_file(next(Path(base_dir).glob("unet/*.safetensors")))
    result = {"base": args.base, "steps": steps, "batch_pairs": 16, "pairs": pairs_key,
              "validation": {"images": int(val_base.size), "seed": 2000, "base_accuracy": score(val_base, val_skills)},
              "test": {"images": int(test_base.size), "seed": 1000, "base_accuracy": score(test_base, test_skills),
                       "base_skills": {s: float(test_base[test_skills == s].mean()) for s in sorted(set(test_skills))}},
              "grid": grid_rows, "chosen": {a: {"lr": lr, "beta": b} for a, (lr, b) in chosen.items()},
              "curves": {}, "arms": {}, "comparisons": {}}  # fmt: skip
    result["reproduced"] = {}  # the grid's centre points against bench/shapes_alignment.py's seed-0 runs
    for arm in chosen:
        mine, theirs = grid_dir / point_name(arm, *GRID[arm][0]) / "train" / "run.json", out / arm / "train" / "run.json"
        if mine.is_file() and theirs.is_file():
            checksum = lambda f: json.loads(f.read_text())["result"]["trainable_checksum"]  # noqa: E731
            result["reproduced"][arm] = {"grid": checksum(mine), "alignment": checksum(theirs)}
    result["validation"]["base_reward"] = mean_reward(grid_dir / "val_base", vals)
    per_seed: dict[str, list[np.ndarray]] = {}
    for arm, (lr, b) in chosen.items():
        name = point_name(arm, lr, b)
        seed0 = grid_dir / name
        curve = [{"step": 0, "val": result["validation"]["base_accuracy"], "reward": result["validation"]["base_reward"], "distance": 0.0}]
        for k in range(1, steps // quarter + 1):
            folder = seed0 / ("val" if k * quarter == steps else f"val-{k * quarter}")
            unet = (seed0 / "train" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors" if k * quarter == steps
                    else seed0 / "train" / "checkpoints" / f"step-{k * quarter:06d}" / "trainable.safetensors")  # fmt: skip
            curve.append({"step": k * quarter, "val": score(correct(folder, vals), val_skills),
                          "reward": mean_reward(folder, vals), "distance": unet_distance(unet, base_unet)})  # fmt: skip
        result["curves"][arm] = curve
        per_seed[arm] = [correct(grid_dir / (name + ("" if s == 0 else f"-s{s}")) / "test", tests) for s in TEST_SEEDS]
    mean = {a: np.mean(v, axis=0) for a, v in per_seed.items()}
    for a, oks in per_seed.items():
        change = paired_change(oks, test_base, test_skills, test_groups)
        result["arms"][a] = {"accuracy": score(mean[a], test_skills), "change": change, "per_seed_change": change["per_seed"],
                             "skills": {s: float(mean[a][test_skills == s].mean()) for s in sorted(set(test_skills))}}  # fmt: skip
    for a, b in COMPARISONS:
        if a in mean and b in mean:
            result["comparisons"][f"{a} - {b}"] = paired_change(per_seed[a], per_seed[b], test_skills, test_groups)
    if args.pool_run:
        result["pooled"] = pooled_with_run(args.pool_run, test_file, tests, test_base, per_seed,
                                           lambda f: correct(f, tests), test_skills, test_groups)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results-grid.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else format_result(result))


RUN_ARMS = {"smpo_inv": "smpo", "dpo": "dpo"}  # this script's arm: its name in smpo shapes run


def pooled_with_run(run: Path, test_file: Path, tests: list, test_base: np.ndarray, per_seed: dict[str, list],
                    correct_of, skills: np.ndarray, groups: np.ndarray) -> dict:  # fmt: skip
    """The chosen settings' test seeds plus a `smpo shapes run` folder's seeds of the same arms: two independent
    draws of the pairs, on the same evaluation images (checked: captions and the base's verdicts)."""
    from smpo_cli.shapes.experiment import mean_ci

    evals = run / "eval"
    if (evals / "captions.txt").read_text() != test_file.read_text():
        raise SystemExit(f"--pool-run {run}: its evaluation captions differ from {test_file}")
    if not np.array_equal(correct_of(evals / "base"), test_base):
        raise SystemExit(f"--pool-run {run}: its base images are judged differently (another base or seed)")
    pooled, seeds = {}, {}
    for arm, theirs in RUN_ARMS.items():
        folders = sorted(evals.glob(f"{theirs}-s*"), key=lambda f: int(f.name.rsplit("-s", 1)[1]))
        if arm in per_seed and folders:
            pooled[arm] = per_seed[arm] + [correct_of(f) for f in folders]
            seeds[arm] = [f"grid-s{s}" for s in TEST_SEEDS] + [f"run-{f.name}" for f in folders]
    out = {"run": str(run), "seeds": seeds, "arms": {a: paired_change(v, test_base, skills, groups) for a, v in pooled.items()},
           "comparisons": {}}  # fmt: skip
    if len(pooled) == 2 and len(pooled["smpo_inv"]) == len(pooled["dpo"]):
        d = paired_change(pooled["smpo_inv"], pooled["dpo"], skills, groups)
        d["t_interval_over_runs"] = mean_ci(d["per_seed"])  # training seeds and pair draws as the noise
        out["comparisons"]["smpo_inv - dpo"] = d
    return out


def format_result(r: dict) -> str:
    ci = lambda d: f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"  # noqa: E731
    v, t = r["validation"], r["test"]
    lines = [f"validation: base {v['base_accuracy']:.1%} on {v['images']} images; {r['steps']} steps x 16 pairs per run",
             f"{'arm':10} {'lr':>8} {'beta':>7}  val change [95% CI]"]  # fmt: skip
    for arm, rows in r["grid"].items():
        for row in rows:
            mark = " <- chosen" if (row["lr"], row["beta"]) == (r["chosen"][arm]["lr"], r["chosen"][arm]["beta"]) else ""
            mark = " (edge check, not eligible)" if row.get("edge_check") else mark
            lines.append(f"{arm:10} {row['lr']:>8g} {row['beta'] if row['beta'] is not None else '-':>7}  {ci(row['change'])}{mark}")
    lines.append("curves (validation, seed 0): step: accuracy / mean shapes-pickscore / distance from the base")
    for arm, curve in r["curves"].items():
        lines.append(f"{arm:10} " + "  ".join(f"{c['step']}: {c['val']:.1%}/{c['reward']:.4f}/{c['distance']:.2f}" for c in curve))
    lines.append(f"test: base {t['base_accuracy']:.1%} on {t['images']} images; chosen settings, seeds {list(TEST_SEEDS)} pooled")
    for arm, a in r["arms"].items():
        lines.append(f"{arm:10} {a['accuracy']:>7.1%}  change {ci(a['change'])}  per seed "
                     + ", ".join(f"{100 * x:+.1f}" for x in a["per_seed_change"]))  # fmt: skip
    for pair, d in r["comparisons"].items():
        lines.append(f"{pair:22} {ci(d)}  per seed " + ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"]))
    if "pooled" in r:
        lines.append(f"pooled with {r['pooled']['run']} (a second draw of the pairs, same evaluation):")
        for name, d in [*r["pooled"]["arms"].items(), *r["pooled"]["comparisons"].items()]:
            label = name if " - " in name else f"{name} - base"
            lines.append(f"{label:22} {ci(d)}  per run " + ", ".join(f"{100 * x:+.1f}" for x in d["per_seed"]))
            if "t_interval_over_runs" in d:
                t = d["t_interval_over_runs"]
                lines.append(f"{'':22} t-interval over the {t['n']} runs: {100 * t['mean']:+.1f} +- {100 * t['ci95']:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
