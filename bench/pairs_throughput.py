"""`smpo pairs` throughput: scoring while generating (pipeline=true) vs generate-all-then-score-all (pipeline=false).

Both variants run the real stage on the shipped shapes model with the same prompts, seeds and reward models, each in
its own process with the same torch thread count, interleaved round by round (the first variant alternates); the
table reports median wall seconds, images per second and the ratio. Every run's pairs.parquet must be identical
across variants (the bench fails otherwise).

Rewards: shapes-pickscore (0.6 MB, 32 px) and, unless --light, a random CLIP of the "small" size of
bench/score_throughput.py (224 px input, 4+4 layers): a reward that costs about what the generator does, as real
reward models (ViT-H PickScore against SD1.5 at 512 px) do.

    python bench/pairs_throughput.py                       # 64 prompts x 4 images, 3 rounds, 1 thread per process
    python bench/pairs_throughput.py --threads 2 --rounds 5
    python bench/pairs_throughput.py --json                # one JSON object (includes "pipelined_speedup")
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("pipelined", "sequential")


def run_stage(out: Path, variant: str, args, rewards: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "smpo_cli", "-q", "pairs", "--recipe", "pairs_tiny_cpu", "-o", str(out),
           f"prompts.limit={args.prompts}", f"sampling.images_per_prompt={args.images}",
           f"sampling.num_inference_steps={args.steps}", f"sampling.batch_size={args.batch}",
           f"reward_batch_size={args.batch}", rewards, f"pipeline={str(variant == 'pipelined').lower()}",
           "logging.progress=false", "device=cpu"]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--images", type=int, default=4, help="images per prompt")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--batch", type=int, default=32, help="images per generation batch and per scoring chunk")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (the same for both variants)")
    ap.add_argument("--light", action="store_true", help="only shapes-pickscore (scoring then costs almost nothing)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rewards = "rewards=[{name: pickscore, path: shapes-pickscore}]"
        if not args.light:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from score_throughput import build_model

            build_model(root / "clip-small", "small")
            rewards = (f"rewards=[{{name: pickscore, path: shapes-pickscore}}, {{name: clip, path: {root / 'clip-small'}, "
                       "output: cosine, label: clip_small}]")  # fmt: skip
        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        reference = None
        identical = True
        for r in range(args.rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                out = root / f"{variant}-{r}"
                seconds[variant].append(run_stage(out, variant, args, rewards))
                table = pq.read_table(out / "pairs.parquet")
                reference = table if reference is None else reference
                identical &= table.equals(reference)
    images = args.prompts * args.images
    med = {v: statistics.median(seconds[v]) for v in VARIANTS}
    result = {
        "images": images, "rounds": args.rounds, "threads_per_process": args.threads, "cpus": os.cpu_count(),
        "rewards": ["shapes-pickscore"] + ([] if args.light else ["clip-small (random, 224 px)"]),
        "median_seconds": med, "images_per_second": {v: images / med[v] for v in VARIANTS},
        "all_seconds": seconds, "pipelined_speedup": med["sequential"] / med["pipelined"], "identical_pairs": identical,
    }  # fmt: skip
    if not identical:
        raise SystemExit("pairs.parquet differs between runs: " + json.dumps(result))
    if args.json:
        print(json.dumps(result))
        return
    print(f"smpo pairs, {images} images ({args.prompts} prompts x {args.images}), {args.steps} steps, rewards "
          f"{' + '.join(result['rewards'])}; {args.threads} torch thread(s) per process, {os.cpu_count()} CPUs, "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'variant':12} {'median s':>9} {'images/s':>9}")
    for v in VARIANTS:
        print(f"{v:12} {med[v]:>9.1f} {result['images_per_second'][v]:>9.2f}")
    print(f"pipelined_speedup (sequential / pipelined): {result['pipelined_speedup']:.2f}x; pairs identical: {identical}")


if __name__ == "__main__":
    main()
