"""The (pair, t) visits a training run will make, computed from its recipe without loading any weights.

Training randomness does not depend on how a step's pairs are split (``smpo_cli.training.data.PositionSampler``
and ``smpo_cli.training.step.PairDraws``): optimiser step ``s`` consumes global positions ``[s*G, (s+1)*G)`` of
the concatenated epoch orders (``G`` pairs per step), position ``pos = epoch * n + k`` is pair
``epoch_order(table, seed, epoch)[k]``, and its timestep is the first ``randint(T)`` of
``PairDraws(seed, s, [pos])`` after the VAE posterior seeds (drawn first when ``data.latents=sample``), exactly
as ``micro_batch_loss`` draws them for online exact-t inversion. A plan cache made from these visits therefore
holds the very latents and timesteps an online run would compute (a run with a step skipped for a non-finite
loss shifts later steps by one step of positions and is not covered).
"""

from __future__ import annotations

from dataclasses import dataclass

from smpo_cli.config.schema import TrainRecipe


@dataclass(frozen=True)
class Visit:
    step: int  # optimiser step (0-based)
    position: int  # global position in the data order
    index: int  # position into the pair table (load_pair_table order)
    t: int  # the timestep training draws for this pair


def pairs_per_step(recipe: TrainRecipe, processes: int = 1) -> int:
    """G: pairs per optimiser step, as ``plan_batches`` splits them for a fresh run on ``processes`` processes."""
    from smpo_cli.training.batching import plan_batches

    return plan_batches(recipe, processes, None).pairs_per_step


def visit_timestep(recipe: TrainRecipe, step: int, position: int, num_train_timesteps: int = 1000) -> int:
    """The t ``micro_batch_loss`` draws for the pair at ``position`` in ``step`` (online or plan, exact mode)."""
    from smpo_cli.training.step import PairDraws

    draws = PairDraws(recipe.seed, step, [position])
    if recipe.data.latents == "sample":
        draws.image_seeds()  # drawn inside the VAE encode, before t
    return int(draws.randint(num_train_timesteps)[0])


def visit_plan(recipe: TrainRecipe, processes: int = 1, table=None, num_train_timesteps: int = 1000,
               steps: range | None = None) -> list[Visit]:  # fmt: skip
    """Every visit of steps ``[0, train.max_steps)`` (or ``steps``) in training order; ``table`` defaults to
    ``load_pair_table(recipe)`` (the light columns only: no images, no weights)."""
    from smpo_cli.training.data import epoch_order, load_pair_table

    if table is None:
        table = load_pair_table(recipe)
    G = pairs_per_step(recipe, processes)
    n = len(table.rows)
    orders: dict = {}
    out = []
    for step in steps if steps is not None else range(recipe.train.max_steps):
        for pos in range(step * G, (step + 1) * G):
            epoch, k = divmod(pos, n)
            if epoch not in orders:
                orders = {epoch: epoch_order(table, recipe.seed, epoch)}
            out.append(Visit(step, pos, int(orders[epoch][k]), visit_timestep(recipe, step, pos, num_train_timesteps)))
    return out
