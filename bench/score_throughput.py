"""Scoring throughput: `smpo score` vs a one-image-at-a-time loop like the official SmPO script.

Both sides use the same PickScore-architecture model (random weights, ViT-B/16-shaped CLIP by
default), the same Pick-a-Pic-shaped parquet of JPEG pairs, the same precision and machine. Each
measurement runs in its own process (so peak memory is per variant), and the variants are
interleaved round by round; the table reports medians and the ratio.

    python bench/score_throughput.py                      # CPU, fp32, 48 pairs x 3 rounds
    python bench/score_throughput.py --device cuda --pairs 512 --bf16
    python bench/score_throughput.py --json               # one JSON object (includes "speedup")

The loop baseline decodes each JPEG in the main process, and for every image separately runs the
processor, encodes the prompt and the image, and takes the cosine: what `preprocessing.py` of the
official code does per image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # name: (vision hidden, layers, heads, patch, text hidden, text layers, projection)
    "vit-b16": (768, 12, 12, 16, 512, 12, 512),
    "small": (256, 4, 4, 16, 256, 4, 256),
}


def build_model(dest: Path, size: str) -> None:
    import torch
    from transformers import CLIPConfig, CLIPModel

    from smpo_cli.rewards.tiny import _clip_processor, clip_bpe_files

    vh, vl, heads, patch, th, tl, proj = SIZES[size]
    tok_dir = dest / "_bpe"
    clip_bpe_files(tok_dir)
    processor = _clip_processor(tok_dir)
    tok = processor.tokenizer
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=th, intermediate_size=4 * th, num_hidden_layers=tl,
                         num_attention_heads=th // 64, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         projection_dim=proj),
        vision_config=dict(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl, num_attention_heads=heads,
                           image_size=224, patch_size=patch, hidden_act="gelu", projection_dim=proj),
        projection_dim=proj,
    )  # fmt: skip
    CLIPModel(cfg).save_pretrained(str(dest))
    processor.save_pretrained(str(dest))


def build_data(path: Path, pairs: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    prompts = ["a photo of a cat on a red sofa", "an oil painting of a blue dog", "a city street at night, photo"]

    def jpeg() -> bytes:
        arr = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    cols = {"caption": [prompts[i % 3] for i in range(pairs)], "jpg_0": [jpeg() for _ in range(pairs)],
            "jpg_1": [jpeg() for _ in range(pairs)], "label_0": [float(i % 2) for i in range(pairs)]}  # fmt: skip
    pq.write_table(pa.table(cols), path)


# ----------------------------------------------------------------------------- workers (one process each)
def worker_smpo(args) -> dict:
    from smpo_cli.config import load_recipe
    from smpo_cli.scoring.runner import run_scoring

    dtype = args.dtype
    recipe = load_recipe(None, "score", [
        f"data.path={args.data}", f"output_dir={args.out_dir}", f"reward.path={args.model}",
        f"reward.batch_size={args.batch_size}", f"data.num_workers={args.workers}", f"device={args.device}",
        f"reward.dtype={dtype}", "data.drop_ties=false", f"data.rows_per_shard={args.pairs}",
    ]).recipe  # fmt: skip
    result = run_scoring(recipe)
    import pandas as pd

    df = pd.read_parquet(Path(args.out_dir) / "data")
    return {"pairs_per_s": result.pairs_per_second, "cos0": df["pickscore_cosine_0"].tolist(),
            "cos1": df["pickscore_cosine_1"].tolist()}  # fmt: skip


def worker_loop(args) -> dict:
    import pyarrow.parquet as pq
    import torch
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = CLIPModel.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    table = pq.read_table(args.data).to_pydict()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    cos = ([], [])
    for i, prompt in enumerate(table["caption"]):
        for side in (0, 1):  # one image at a time, prompt re-encoded every time
            image = Image.open(io.BytesIO(table[f"jpg_{side}"][i])).convert("RGB")
            with torch.inference_mode():
                inputs = processor(images=image, text=[prompt], padding=True, truncation=True, max_length=77,
                                   return_tensors="pt").to(args.device)  # fmt: skip
                img = model.get_image_features(pixel_values=inputs["pixel_values"].to(dtype))
                txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                img = getattr(img, "pooler_output", img)
                txt = getattr(txt, "pooler_output", txt)
                img = img / img.norm(dim=-1, keepdim=True)
                txt = txt / txt.norm(dim=-1, keepdim=True)
                cos[side].append(float((img * txt).sum().float()))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"pairs_per_s": len(table["caption"]) / seconds, "cos0": cos[0], "cos1": cos[1]}


def run_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = worker_smpo(args) if args.worker == "smpo" else worker_loop(args)
    if args.device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver
def measure(variant: str, dtype: str, args, tmp: Path, round_: int) -> dict:
    out = tmp / f"{variant}-{dtype}-{round_}"
    result = tmp / f"{variant}-{dtype}-{round_}.json"
    cmd = [sys.executable, __file__, "--worker", variant, "--model", str(tmp / "model"), "--data", str(tmp / "pairs.parquet"),
           "--out-dir", str(out), "--result", str(result), "--dtype", dtype, "--device", args.device,
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--pairs", str(args.pairs),
           "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "SMPO_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{variant} worker failed:\n{proc.stderr.read()[-3000:]}")
    data = json.loads(result.read_text())
    data["peak_rss_mib"] = usage.ru_maxrss / 1024
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", choices=sorted(SIZES), default="vit-b16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16, help="smpo: pairs per batch")
    ap.add_argument("--workers", type=int, default=2, help="smpo: decoding worker processes")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="torch threads per process")
    ap.add_argument("--bf16", action="store_true", help="also run smpo in bfloat16 (own row, vs fp32)")
    ap.add_argument("--json", action="store_true")
    # worker mode
    ap.add_argument("--worker", choices=["smpo", "loop"])
    for name in ("--model", "--data", "--out-dir", "--result", "--dtype"):
        ap.add_argument(name)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="smpo-bench-") as tmp_str:
        tmp = Path(tmp_str)
        build_model(tmp / "model", args.size)
        build_data(tmp / "pairs.parquet", args.pairs)
        variants = [("loop", "float32"), ("smpo", "float32")] + ([("smpo", "bfloat16")] if args.bf16 else [])
        runs: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):  # interleaved
            for v in variants if r % 2 == 0 else list(reversed(variants)):
                runs[v].append(measure(*v, args, tmp, r))
    med = {v: statistics.median(x["pairs_per_s"] for x in runs[v]) for v in variants}
    peak_rss = {v: max(x["peak_rss_mib"] for x in runs[v]) for v in variants}
    base = med[("loop", "float32")]
    ref = runs[("smpo", "float32")][0]
    loop_ref = runs[("loop", "float32")][0]
    import numpy as np

    agree = float(np.max(np.abs(np.array(ref["cos0"] + ref["cos1"]) - np.array(loop_ref["cos0"] + loop_ref["cos1"]))))
    figures = {
        "device": args.device, "model": args.size, "pairs": args.pairs, "rounds": args.rounds,
        "batch_size": args.batch_size, "workers": args.workers, "threads": args.threads,
        "loop_pairs_per_s": base, "smpo_pairs_per_s": med[("smpo", "float32")],
        "speedup": med[("smpo", "float32")] / base,
        "max_abs_cosine_diff_smpo_vs_loop": agree,
        "peak_rss_mib": {f"{a}-{b}": peak_rss[(a, b)] for a, b in variants},
        "all_pairs_per_s": {f"{a}-{b}": [x["pairs_per_s"] for x in runs[(a, b)]] for a, b in variants},
    }  # fmt: skip
    if args.device.startswith("cuda"):
        figures["peak_gpu_mib"] = {f"{a}-{b}": max(x.get("peak_gpu_mib", 0) for x in runs[(a, b)]) for a, b in variants}
    if args.bf16:
        bf = runs[("smpo", "bfloat16")][0]
        c0, c1 = np.array(ref["cos0"]), np.array(ref["cos1"])
        b0, b1 = np.array(bf["cos0"]), np.array(bf["cos1"])
        figures["bf16_speedup_vs_loop_fp32"] = med[("smpo", "bfloat16")] / base
        figures["bf16_max_abs_score_diff"] = float(max(np.abs(c0 - b0).max(), np.abs(c1 - b1).max()))
        figures["bf16_winner_flips"] = int(((c0 >= c1) != (b0 >= b1)).sum())
    if args.json:
        print(json.dumps(figures))
        return
    print(f"score throughput, {args.size} CLIP, {args.pairs} pairs x {args.rounds} rounds, device {args.device}, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'variant':<22}{'pairs/s (median)':>18}{'vs loop':>10}{'peak RSS MiB':>14}")
    for a, b in variants:
        print(f"{a + ' ' + b:<22}{med[(a, b)]:>18.2f}{med[(a, b)] / base:>9.2f}x{peak_rss[(a, b)]:>14.0f}")
    print(f"max |cosine smpo - loop| (fp32): {agree:.2e}")
    if args.bf16:
        print(f"bf16 vs fp32: max |score diff| {figures['bf16_max_abs_score_diff']:.2e}, "
              f"winner flips {figures['bf16_winner_flips']} / {args.pairs}")  # fmt: skip


if __name__ == "__main__":
    main()
