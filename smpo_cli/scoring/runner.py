"""``run_scoring(recipe)``: score every pair with a reward model and add the smoothed preference p.

Output folder::

    data/part-00000.parquet ...   every input column + smpo_row + per-output scores, winner, p
    shards/part-00000.json        per-shard counts (written before its parquet; the parquet marks it done)
    shards/fingerprint.json       the settings the shards were made with (a rerun resumes only if equal)
    skipped.jsonl                 one line per skipped pair: row, shard, reason
    summary.json                  totals, skips by reason, ties, human/reward agreement, p distribution

Shards are written atomically, so a process killed at any point loses at most the shard in flight,
and a rerun skips finished shards; the final files equal an uninterrupted run's. Under
``accelerate launch`` process i scores shards i, i+N, ...; the main process finalises.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from smpo_cli.config.schema import ScoreRecipe
from smpo_cli.errors import DataError
from smpo_cli.scoring.decode import RowDecoder, collate
from smpo_cli.scoring.preference import (
    PICKSCORE_COSINE_R_MAX,
    PICKSCORE_COSINE_R_MIN,
    TIE_LABEL,
    human_winner,
    p_distribution,
    smoothed_p,
)
from smpo_cli.scoring.sources import Columns, PairSource, open_source, resolve_columns
from smpo_cli.utils.atomic import atomic_path, write_json
from smpo_cli.utils.logging import get_logger
from smpo_cli.utils.shards import Shard, ShardStore, count_reasons

logger = get_logger(__name__)
ROW_COLUMN = "smpo_row"
METADATA_KEY = b"smpo"


@dataclass
class ScoreResult:
    output_dir: str
    rows: int
    scored: int
    ties_dropped: int
    skipped: dict[str, int]
    shards: int
    shards_resumed: int
    reward: dict[str, Any]
    output: str
    normalization: dict[str, Any]
    agreement: dict[str, Any]
    p: dict[str, Any]
    seconds: float
    pairs_per_second: float
    columns: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- settings
def fingerprint(recipe: ScoreRecipe) -> dict[str, Any]:
    """The settings that determine the shards' contents (not speed knobs like batch size)."""
    data = recipe.data.model_dump(mode="json", exclude={"num_workers"})
    data["path"] = str(Path(recipe.data.path).expanduser().resolve()) if "*" not in recipe.data.path else recipe.data.path
    reward = recipe.reward.model_dump(mode="json", exclude={"batch_size"})
    return {"data": data, "reward": reward}


def _store(recipe: ScoreRecipe) -> ShardStore:
    return ShardStore(Path(recipe.output_dir), "data", ".parquet")


def resume_ok(recipe: ScoreRecipe) -> bool:
    """True when output_dir holds shards made with these settings (a rerun then resumes)."""
    return _store(recipe).check_fingerprint(fingerprint(recipe), recipe.output_dir)


def _choose_output(recipe: ScoreRecipe, reward) -> str:
    return choose_output(recipe.reward.output, reward, "reward.output")


def choose_output(requested: str | None, reward, key: str) -> str:
    """The score p is computed from: ``requested``, else cosine for PickScore (SmPO's constants), else the default."""
    output = requested or ("cosine" if reward.name == "pickscore" else reward.default_output)
    if output not in reward.output_names:
        raise DataError(f"{key}={output!r} is not an output of {reward.name}", hint="outputs: " + ", ".join(reward.output_names))
    return output


def _fixed_range(recipe: ScoreRecipe, output: str, reward=None) -> tuple[float, float] | None:
    spec = recipe.reward
    if spec.normalization == "dataset":
        return None
    if spec.r_min is not None and spec.r_max is not None:
        return spec.r_min, spec.r_max
    # a model's own range (shapes-pickscore's smpo_reward.json, the shapes judge's [0, 1]) ...
    known = reward.known_range(output) if reward is not None else None
    if known is not None:
        return known
    if spec.name == "pickscore" and output == "cosine":  # ... else PickScore's official constants
        return PICKSCORE_COSINE_R_MIN, PICKSCORE_COSINE_R_MAX
    return None  # auto without known constants: from the dataset


def _resolve_device_dtype(recipe: ScoreRecipe, state) -> tuple[str, str]:
    import torch

    from smpo_cli.utils.distributed import stage_device

    device = stage_device(state, recipe.device)
    dtype = recipe.reward.dtype
    if dtype == "auto":
        dtype = "float16" if torch.device(device).type == "cuda" else "float32"
    return device, dtype


# ----------------------------------------------------------------------------- one shard
def _score_shard(
    k: int,
    start: int,
    stop: int,
    source: PairSource,
    cols: Columns,
    recipe: ScoreRecipe,
    reward,
    output: str,
    fixed: tuple[float, float] | None,
    store: ShardStore,
    progress,
    task,
) -> None:
    import torch

    table = source.read(start, stop)
    n = table.num_rows
    labels = None
    if cols.label is not None:
        labels = np.asarray(table.column(cols.label).to_numpy(zero_copy_only=False), dtype=np.float64)
    is_tie = (labels == TIE_LABEL) if (labels is not None and recipe.data.drop_ties) else np.zeros(n, dtype=bool)
    todo = np.flatnonzero(~is_tie)
    decoder = RowDecoder(
        [table.column(cols.image_0).to_pylist(), table.column(cols.image_1).to_pylist()],
        ["image_0", "image_1"],
        table.column(cols.prompt).to_pylist(),
        source.base_dir,
        recipe.data.max_image_pixels,
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(decoder, todo.tolist()),
        batch_size=recipe.reward.batch_size,
        num_workers=recipe.data.num_workers if len(todo) > recipe.reward.batch_size else 0,
        collate_fn=collate,
    )
    scores = {name: (np.full(n, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32)) for name in reward.output_names}
    scored = np.zeros(n, dtype=bool)
    skipped: list[dict[str, Any]] = []
    for batch in loader:
        valid = [d for d in batch if d.skip_reason is None]
        for d in batch:
            if d.skip_reason is not None:
                skipped.append({"row": start + d.row, "shard": k, "reason": d.skip_reason})
        if valid:
            out_a, out_b = reward.score_pairs(
                [d.images[0] for d in valid], [d.images[1] for d in valid], [d.prompt for d in valid]
            )
            rows = np.array([d.row for d in valid])
            for name in reward.output_names:
                scores[name][0][rows] = out_a[name].numpy()
                scores[name][1][rows] = out_b[name].numpy()
            scored[rows] = True
        progress.update(task, advance=len(batch))
    keep = np.flatnonzero(scored)
    out = table.take(pa.array(keep, type=pa.int64()))
    prefix = reward.name
    new_columns: dict[str, pa.Array] = {ROW_COLUMN: pa.array(keep + start, type=pa.int64())}
    for name in reward.output_names:
        new_columns[f"{prefix}_{name}_0"] = pa.array(scores[name][0][keep])
        new_columns[f"{prefix}_{name}_1"] = pa.array(scores[name][1][keep])
    if fixed is not None:
        winner, p = smoothed_p(scores[output][0][keep], scores[output][1][keep], *fixed)
        new_columns[f"{prefix}_winner"] = pa.array(winner)
        new_columns[f"{prefix}_p"] = pa.array(p)
    for name, values in new_columns.items():
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, values)
    meta = {
        "reward": reward.metadata,
        "output": output,
        "base_dir": str(Path(source.base_dir).resolve()),  # where relative image paths in this table point
        "normalization": None if fixed is None else {"r_min": fixed[0], "r_max": fixed[1]},
    }
    out = out.replace_schema_metadata({**(out.schema.metadata or {}), METADATA_KEY: json.dumps(meta).encode()})
    counts = {"shard": k, "start": start, "stop": stop, "rows": n, "ties_dropped": int(is_tie.sum()),
              "kept": int(len(keep)), "skipped": skipped}  # fmt: skip
    store.write_sidecar(k, counts)
    if len(keep) == 0:
        return  # an empty parquet file breaks `datasets`; the sidecar alone marks this shard done
    with atomic_path(store.payload(k), suffix=".parquet") as tmp:
        pq.write_table(out, tmp)


# ----------------------------------------------------------------------------- finalise
def _add_dataset_p(store: ShardStore, shards: list[int], prefix: str, output: str) -> dict[str, Any]:
    """Second pass for dataset normalisation: global min/max over both images, then p per shard."""
    cols = [f"{prefix}_{output}_0", f"{prefix}_{output}_1"]
    lo, hi = np.inf, -np.inf
    for k in shards:
        t = pq.read_table(store.payload(k), columns=cols)
        for c in cols:
            v = t.column(c).to_numpy()
            if v.size:
                lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    if not hi > lo:
        raise DataError(
            f"cannot normalise {prefix} scores from the dataset: fewer than two distinct values",
            hint="score more pairs, or set reward.r_min/reward.r_max",
        )
    for k in shards:
        path = store.payload(k)
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        if meta.get("normalization") == {"r_min": lo, "r_max": hi}:
            continue  # already finalised by an earlier, interrupted finalise
        winner, p = smoothed_p(table.column(cols[0]).to_numpy(), table.column(cols[1]).to_numpy(), lo, hi)
        for name, values in ((f"{prefix}_winner", pa.array(winner)), (f"{prefix}_p", pa.array(p))):
            if name in table.column_names:
                table = table.drop_columns([name])
            table = table.append_column(name, values)
        meta["normalization"] = {"r_min": lo, "r_max": hi}
        table = table.replace_schema_metadata({**table.schema.metadata, METADATA_KEY: json.dumps(meta).encode()})
        with atomic_path(path, suffix=".parquet") as tmp:
            pq.write_table(table, tmp)
    return {"mode": "dataset", "r_min": lo, "r_max": hi}


def _finalise(store: ShardStore, shards: list[Shard], cols: Columns, reward_meta: dict, output: str,
              fixed: tuple[float, float] | None) -> dict[str, Any]:  # fmt: skip
    prefix = reward_meta["name"]
    with_rows = [s.index for s in shards if store.has_payload(s.index)]
    if fixed is None:
        normalization = _add_dataset_p(store, with_rows, prefix, output)
    else:
        normalization = {"mode": "fixed", "r_min": fixed[0], "r_max": fixed[1]}
    rows = ties = scored = 0
    winners, humans, ps = [], [], []
    for shard in shards:
        counts = store.read_sidecar(shard.index) or {}
        rows += counts["rows"]
        ties += counts["ties_dropped"]
        scored += counts["kept"]
    for k in with_rows:
        wanted = [f"{prefix}_winner", f"{prefix}_p"] + ([cols.label] if cols.label else [])
        t = pq.read_table(store.payload(k), columns=wanted)
        winners.append(t.column(f"{prefix}_winner").to_numpy())
        ps.append(t.column(f"{prefix}_p").to_numpy())
        if cols.label:
            humans.append(human_winner(t.column(cols.label).to_numpy(zero_copy_only=False)))
    winner = np.concatenate(winners) if winners else np.zeros(0, np.int8)
    p = np.concatenate(ps) if ps else np.zeros(0)
    agreement: dict[str, Any] = {"labelled_pairs": 0}
    if humans:
        human = np.concatenate(humans)
        labelled = human >= 0
        agreement = {
            "labelled_pairs": int(labelled.sum()),
            "reward_agrees_with_human": float((winner[labelled] == human[labelled]).mean()) if labelled.any() else None,
        }
    skipped = store.merge_skipped(shards)
    return {
        "rows": rows,
        "ties_dropped": ties,
        "scored": scored,
        "skipped": count_reasons(skipped),
        "normalization": normalization,
        "agreement": agreement,
        "p": p_distribution(p),
    }


# ----------------------------------------------------------------------------- entry point
def run_scoring(recipe: ScoreRecipe) -> ScoreResult:
    """Score ``recipe.data`` with ``recipe.reward``; write shards, skipped.jsonl and summary.json."""
    from rich.progress import TextColumn

    from smpo_cli.rewards import load_reward
    from smpo_cli.utils.distributed import partial_state
    from smpo_cli.utils.progress import make_progress

    started = time.perf_counter()
    state = partial_state()
    out_dir = Path(recipe.output_dir)
    source = open_source(recipe.data.path, recipe.data.split)
    d = recipe.data
    cols = resolve_columns(source, d.layout, d.image_0_column, d.image_1_column, d.prompt_column, d.label_column)
    n = min(source.num_rows, d.limit) if d.limit else source.num_rows
    if n == 0:
        raise DataError(f"data.path {recipe.data.path}: the dataset has no rows")
    store = _store(recipe)
    shards = store.plan(n, d.rows_per_shard)
    if state.is_main_process:
        store.write_fingerprint(fingerprint(recipe))
    done = {s.index for s in shards if store.is_done(s.index)}
    mine = [s for s in store.mine(shards, state.process_index, state.num_processes) if s.index not in done]
    device, dtype = _resolve_device_dtype(recipe, state)
    reward_path = recipe.reward.path
    if reward_path == "tiny":  # the embedded tiny random model of this family (offline demos, tests)
        from smpo_cli.rewards.tiny import tiny_reward_path

        reward_path = str(tiny_reward_path(recipe.reward.name, build=state.is_main_process))
        state.wait_for_everyone()
    reward = load_reward(
        recipe.reward.name, reward_path, device=device, dtype=dtype,
        batch_size=2 * recipe.reward.batch_size, **recipe.reward.options,
    )  # fmt: skip
    output = _choose_output(recipe, reward)
    fixed = _fixed_range(recipe, output, reward)
    logger.info(
        "scoring %d pairs in %d shards (%d already done) with %s (%s, output %s) on %s/%s",
        n, len(shards), len(done), reward.name, reward.version, output, device, dtype,
    )  # fmt: skip
    todo_pairs = sum(s.stop - s.start for s in mine)
    rate = TextColumn("{task.fields[rate]}")
    t0 = time.perf_counter()
    with make_progress(rate) as progress:
        task = progress.add_task(f"score {reward.name}", total=todo_pairs, rate="")
        for shard in mine:
            _score_shard(shard.index, shard.start, shard.stop, source, cols, recipe, reward, output, fixed, store,
                         progress, task)  # fmt: skip
            pairs = progress.tasks[task].completed
            progress.update(task, rate=f"{pairs / max(time.perf_counter() - t0, 1e-9):.1f} pairs/s")
    scoring_seconds = time.perf_counter() - t0
    state.wait_for_everyone()
    if not state.is_main_process:
        return ScoreResult(str(out_dir), n, 0, 0, {}, len(shards), len(done), reward.metadata, output, {}, {}, {},
                           time.perf_counter() - started, todo_pairs / max(scoring_seconds, 1e-9))  # fmt: skip
    summary = _finalise(store, shards, cols, reward.metadata, output, fixed)
    prefix = reward.name
    result = ScoreResult(
        output_dir=str(out_dir),
        rows=summary["rows"],
        scored=summary["scored"],
        ties_dropped=summary["ties_dropped"],
        skipped=summary["skipped"],
        shards=len(shards),
        shards_resumed=len(done),
        reward=reward.metadata,
        output=output,
        normalization=summary["normalization"],
        agreement=summary["agreement"],
        p=summary["p"],
        seconds=round(time.perf_counter() - started, 3),
        pairs_per_second=round(todo_pairs / max(scoring_seconds, 1e-9), 3),
        columns={
            "scores": f"{prefix}_<output>_0 / {prefix}_<output>_1 for outputs " + ", ".join(reward.output_names),
            "winner": f"{prefix}_winner (0 or 1: the image with the larger {output})",
            "p": f"{prefix}_p (smoothed probability that the reward winner is preferred, >= 0.5)",
            "row": f"{ROW_COLUMN} (row index in the input dataset)",
        },
    )
    write_json(out_dir / "summary.json", result.to_dict())
    return result
