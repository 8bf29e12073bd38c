"""Scored preference pairs for training: winner first, smoothed p, deterministic and resumable order.

The input is the output of ``smpo score`` (or any parquet / save_to_disk / JSONL pairs with the
reward's ``<reward>_winner`` and ``<reward>_p`` columns, and / or a human label ``label_0``). Which
image is the winner follows ``data.labels`` (method.md section 5): ``reward`` takes the reward's winner
(SmPO, as the official code: on an exact reward tie, p = 0.5, image 1 wins), ``human`` the human label
(Diffusion-DPO and the official ``--sft``; human ties and unlabelled pairs are dropped).

Images are decoded lazily in DataLoader workers. The order is a *block shuffle*: blocks (parquet row
groups) in random order, rows inside a block in random order, so each block is read about once per
epoch instead of once per row. The order is a pure function of (seed, epoch), and randomness per
example (crop, flip, empty prompt) is seeded by the example's position, so a resumed run sees exactly
the batches an uninterrupted run would.
A pair with a bad image is skipped whole (both sides) and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smpo_cli.config.schema import PAPER_LABELS, TrainRecipe
from smpo_cli.errors import DataError
from smpo_cli.scoring.decode import SkipPair, open_image
from smpo_cli.scoring.preference import human_winner
from smpo_cli.scoring.sources import PairSource, ParquetSource, open_source, resolve_columns
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)
ROW_COLUMN = "smpo_row"


@dataclass
class PairTable:
    """The light columns of every usable pair, in input order (images stay on disk)."""

    source: PairSource
    image_columns: tuple[str, str]
    rows: np.ndarray  # input row index of each usable pair
    row_ids: np.ndarray  # smpo_row (the cache key) of each usable pair
    prompts: list[str]
    winner: np.ndarray  # 0 or 1: which image goes first (the reward's or the human's choice, per data.labels)
    p: np.ndarray  # probability that the winner is preferred
    blocks: list[tuple[int, int]]  # [start, stop) positions into ``rows`` of each storage block
    labels: str = "reward"  # data.labels as resolved: reward | human
    label_column: str = ""  # the column that chose the winners


def load_pair_table(recipe: TrainRecipe) -> PairTable:
    d = recipe.data
    source = open_source(d.path, d.split)
    cols = resolve_columns(source, "auto")
    reward = d.reward
    labels = d.labels or PAPER_LABELS[recipe.method.name]
    smoothed = recipe.method.name == "smpo" and not recipe.method.binary_labels  # p enters the loss
    winner_col, p_col = f"{reward}_winner", f"{reward}_p"
    names = source.column_names
    if labels == "human" and not (cols.label and cols.label in names):
        raise DataError(
            f"{d.path}: data.labels=human (the {recipe.method.name} default) needs a human label column "
            f"(label_0 or label); columns found: {', '.join(names)}",
            hint="use pairs with human labels, or order the pairs by a reward with data.labels=reward",
        )
    # human labels with the smoothed p: p is the reward's probability for the human winner, so both reward columns
    needed = ([winner_col] if labels == "reward" or smoothed else []) + ([p_col] if smoothed else [])
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(
            f"{d.path}: no {', '.join(missing)} column(s): this dataset was not scored with reward {reward!r}",
            hint=f"run `smpo score --data {d.path} --reward {reward}` first, or set data.reward to the reward it was scored with",
        )
    light = [cols.prompt] + [c for c in (winner_col, p_col) if c in names]
    light += [c for c in (cols.label, ROW_COLUMN) if c and c in names]
    parts = []
    bounds = []  # storage blocks in input-row space
    if isinstance(source, ParquetSource):
        import pyarrow.parquet as pq

        for fi, g, first, n in source._groups:
            parts.append(pq.ParquetFile(source.files[fi]).read_row_group(g, columns=light))
            bounds.append((first, first + n))
    else:
        table = source.read(0, source.num_rows).select(light)
        parts.append(table)
        step = 1024
        bounds = [(s, min(s + step, table.num_rows)) for s in range(0, table.num_rows, step)]
    import pyarrow as pa

    table = pa.concat_tables(parts) if parts else None
    n = table.num_rows if table is not None else 0
    rows = np.arange(n)
    keep = np.ones(n, dtype=bool)
    if d.drop_ties and cols.label and cols.label in table.column_names:
        keep &= table.column(cols.label).to_numpy(zero_copy_only=False) != 0.5
    column = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    has_reward = winner_col in table.column_names
    reward_winner = np.asarray(column(winner_col), dtype=np.int64) if has_reward else np.full(n, -1)
    p = np.asarray(column(p_col), dtype=np.float64) if p_col in table.column_names else np.ones(n)
    if has_reward and p_col in table.column_names:
        # an exact reward tie (p = 0.5): image 1 wins, as the official `1 if score_0 > score_1 else 0`
        reward_winner = np.where(p == 0.5, 1, reward_winner)
    if labels == "human":
        winner = human_winner(column(cols.label)).astype(np.int64)  # -1 for a tie or a missing label: dropped
        # p: the reward's probability that the *human* winner is preferred (below 0.5 where they disagree)
        p = np.where(winner == reward_winner, p, 1.0 - p)
        label_column = cols.label
    else:
        winner, label_column = reward_winner, winner_col
    if not smoothed:
        p = np.ones(n)  # Diffusion-DPO / SFT / the binary-label ablation: the chosen winner, fully trusted
    keep &= np.isfinite(p) & ((winner == 0) | (winner == 1))
    if d.max_pairs is not None:
        keep &= np.cumsum(keep) <= d.max_pairs
    row_ids = (
        np.asarray(table.column(ROW_COLUMN).to_numpy(zero_copy_only=False), dtype=np.int64)
        if ROW_COLUMN in table.column_names
        else rows
    )
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise DataError(f"{d.path}: no usable pairs (after dropping ties and rows without a {labels} winner)")
    # blocks in kept-position space
    blocks, pos = [], 0
    for lo, hi in bounds:
        count = int(keep[lo:hi].sum())
        if count:
            blocks.append((pos, pos + count))
            pos += count
    prompts = table.column(cols.prompt).to_pylist()
    return PairTable(
        source=source,
        image_columns=(cols.image_0, cols.image_1),
        rows=rows[kept],
        row_ids=row_ids[kept],
        prompts=[prompts[i] if isinstance(prompts[i], str) else "" for i in kept],
        winner=winner[kept],
        p=p[kept],
        blocks=blocks,
        labels=labels,
        label_column=label_column,
    )


def epoch_order(table: PairTable, seed: int, epoch: int) -> np.ndarray:
    """Positions into ``table`` in training order for one epoch (block shuffle)."""
    rng = np.random.default_rng([seed, epoch])
    order = []
    for b in rng.permutation(len(table.blocks)):
        lo, hi = table.blocks[b]
        order.append(lo + rng.permutation(hi - lo))
    return np.concatenate(order)


def example_rng(seed: int, position: int) -> np.random.Generator:
    """Randomness of one example (crop, flip, empty prompt): a function of its global position."""
    return np.random.default_rng([seed, 1, position])


class PairExamples(torch.utils.data.Dataset):
    """(global position, table position) -> one training example; None when its images are bad."""

    def __init__(self, recipe: TrainRecipe, table: PairTable, cache=None) -> None:
        self.recipe, self.table, self.cache = recipe, table, cache
        self._block: tuple[int, Any] | None = None  # (block start row, pyarrow table) of the last read

    def __len__(self) -> int:
        return len(self.table.rows)

    def _images(self, row: int) -> tuple[Any, Any]:
        src = self.table.source
        if isinstance(src, ParquetSource):
            for fi, g, first, n in src._groups:
                if first <= row < first + n:
                    if self._block is None or self._block[0] != first:
                        import pyarrow.parquet as pq

                        self._block = (first, pq.ParquetFile(src.files[fi]).read_row_group(g, columns=list(self.table.image_columns)))
                    t = self._block[1]
                    i = row - first
                    return t.column(0)[i].as_py(), t.column(1)[i].as_py()
        t = src.read(row, row + 1)
        return t.column(self.table.image_columns[0])[0].as_py(), t.column(self.table.image_columns[1])[0].as_py()

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any] | None:
        from smpo_cli.models.vae import preprocess

        position, idx = item
        t, d = self.table, self.recipe.data
        rng = example_rng(self.recipe.seed, position)
        w = int(t.winner[idx])
        prompt = t.prompts[idx] if rng.random() >= d.empty_prompt_prob else ""
        out: dict[str, Any] = {"row": int(t.row_ids[idx]), "position": int(position), "prompt": prompt,
                               "p": float(t.p[idx])}  # fmt: skip
        if getattr(self.cache, "by_position", False):  # the plan cache: this visit's x0, x_t and t, winner first
            cached = self.cache.visit(int(position), int(t.row_ids[idx]))
            return cached if "skip_reason" in cached else {**out, **cached}
        if self.cache is not None:
            cached = self.cache.get(int(t.row_ids[idx]))
            order = [w, 1 - w]
            out["latents"] = cached["latents"][order].float()
            out["inverted"] = cached["inverted"][order].float()
            out["original_size"] = cached["original_size"][order]
            out["crop_top_left"] = cached["crop_top_left"][order]
            return out
        values = self._images(int(t.rows[idx]))
        try:
            images = [open_image(v, t.source.base_dir, 50_000_000) for v in values]
        except SkipPair as exc:
            logger.debug("skipping pair %d: %s", t.rows[idx], exc)
            return {"skip_reason": f"row {int(t.rows[idx])}: {exc}"}
        images = [images[w], images[1 - w]]  # winner first
        flip = d.random_flip and rng.random() < 0.5
        pixels, sizes, crops = [], [], []
        for img in images:
            pre = preprocess(img, d.resolution, rng if d.random_crop else None)
            px = pre.pixels.flip(-1) if flip else pre.pixels
            pixels.append(px)
            sizes.append(pre.original_size)
            crops.append(pre.crop_top_left)
        out["pixels"] = torch.stack(pixels)
        out["original_size"] = torch.tensor(sizes)
        out["crop_top_left"] = torch.tensor(crops)
        return out


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the good examples; count the skipped ones (and keep the first reason, for the error a user sees)."""
    good = [x for x in items if x is not None and "skip_reason" not in x]
    reasons = [x["skip_reason"] for x in items if x is not None and "skip_reason" in x]
    batch: dict[str, Any] = {"skipped": len(items) - len(good), "size": len(good), "skip_reason": reasons[:1]}
    if not good:
        return batch
    batch["row"] = torch.tensor([x["row"] for x in good])
    batch["position"] = torch.tensor([x["position"] for x in good])
    batch["prompt"] = [x["prompt"] for x in good]
    batch["p"] = torch.tensor([x["p"] for x in good], dtype=torch.float32)
    for key in ("pixels", "latents", "inverted", "original_size", "crop_top_left", "plan_t", "plan_step"):
        if key in good[0]:
            batch[key] = torch.stack([x[key] for x in good])
    return batch


class PositionSampler(torch.utils.data.Sampler):
    """Micro-batches of this process from global position ``start`` on, epoch after epoch.

    Global micro-batch ``m`` holds positions ``[m * B, (m + 1) * B)`` of the concatenated epoch orders;
    process ``r`` of ``N`` takes micro-batches ``r, r + N, ...``. Yields lists of (position, index).
    """

    def __init__(self, table: PairTable, seed: int, batch_size: int, rank: int, world: int, start_micro: int) -> None:
        self.table, self.seed, self.bs, self.rank, self.world = table, seed, batch_size, rank, world
        self.start_micro = start_micro

    def __iter__(self):
        n = len(self.table.rows)
        micro = self.start_micro
        orders: dict[int, np.ndarray] = {}
        while True:
            if micro % self.world == self.rank:
                batch = []
                for pos in range(micro * self.bs, (micro + 1) * self.bs):
                    epoch, k = divmod(pos, n)
                    if epoch not in orders:
                        orders = {epoch: epoch_order(self.table, self.seed, epoch)}
                    batch.append((pos, int(orders[epoch][k])))
                yield batch
            micro += 1


def cache_for(recipe: TrainRecipe):
    if recipe.inversion.source == "plan":
        from smpo_cli.inversion.plan_cache import open_plan_cache

        return open_plan_cache(recipe)
    if recipe.inversion.source != "cache":
        return None
    from smpo_cli.inversion.cache import InversionCache

    cache = InversionCache(Path(recipe.inversion.cache_path))
    if cache.meta and cache.meta.get("resolution") not in (None, recipe.data.resolution):
        raise DataError(
            f"inversion cache {recipe.inversion.cache_path} was made at resolution {cache.meta['resolution']}, "
            f"training asks data.resolution={recipe.data.resolution}",
            hint="use the cache's resolution or rebuild the cache",
        )
    made_from = (cache.meta or {}).get("data_signature")
    if made_from is not None:
        from smpo_cli.scoring.sources import data_signature

        if made_from != data_signature(recipe.data.path, recipe.data.split):
            raise DataError(
                f"inversion cache {recipe.inversion.cache_path} was made from another version of data.path "
                f"{recipe.data.path} (the table changed since smpo invert): its latents would not match the rows' labels",
                hint="rebuild the cache: smpo invert --overwrite on the table as it is now",
            )
    return cache
