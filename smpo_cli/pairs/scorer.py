"""Scoring ``smpo pairs``' samples chunk by chunk, while generation is still writing them.

The images are cut into fixed chunks of whole prompts (``reward_batch_size // images_per_prompt`` prompts, at least
one), numbered by prompt index. A chunk is scored once all of its images exist: decoded once, then scored by every
reward model whose scores it lacks, and written atomically to ``scores/<label>/<chunk>.json``. Because a chunk's
images are always the same, a resumed run (after a kill), a sequential run and a run split over processes (rank
``r`` scores chunks ``c % world == r``) all give the same scores, bit for bit; a rerun loads only what is missing.
A chunk file is valid only next to its label's ``key.json`` (the reward's settings and the chunk layout); a
changed reward clears that label's chunks and nothing else.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from smpo_cli.config.schema import PairsRecipe, PairsRewardSpec
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)
POLL_SECONDS = 0.05


@dataclass
class LabelScores:
    values: np.ndarray  # raw score per image, prompt-major
    metadata: dict[str, Any]
    output: str
    known_range: list[float] | None


def reward_dtype(recipe: PairsRecipe) -> str:
    from smpo_cli.utils.devices import resolve_device

    if recipe.reward_dtype != "auto":
        return recipe.reward_dtype
    return "float16" if resolve_device(recipe.device).type == "cuda" else "float32"


class ChunkScorer:
    """Scores this process's chunks of ``images[j]`` (prompt-major, ``per_prompt`` per prompt) by every reward."""

    def __init__(self, recipe: PairsRecipe, out: Path, image_files: list[Path], prompts: list[str], per_prompt: int,
                 *, rank: int = 0, world: int = 1) -> None:  # fmt: skip
        self.recipe, self.files, self.prompts, self.per_prompt = recipe, image_files, prompts, per_prompt
        self.root = out / "scores"
        self.prompts_per_chunk = max(1, recipe.reward_batch_size // per_prompt)
        n_prompts = len(image_files) // per_prompt
        self.chunks = [(s, min(s + self.prompts_per_chunk, n_prompts)) for s in range(0, n_prompts, self.prompts_per_chunk)]
        self.mine = [c for c in range(len(self.chunks)) if c % world == rank]
        self.dtype = reward_dtype(recipe)
        self._rewards: dict[str, Any] = {}
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ layout on disk
    def key(self, spec: PairsRewardSpec) -> dict[str, Any]:
        return {"reward": spec.model_dump(mode="json", exclude={"weight", "label", "quantiles", "r_min", "r_max"}),
                "dtype": self.dtype, "per_prompt": self.per_prompt, "prompts_per_chunk": self.prompts_per_chunk}  # fmt: skip

    def folder(self, spec: PairsRewardSpec) -> Path:
        return self.root / spec.prefix

    def chunk_file(self, spec: PairsRewardSpec, c: int) -> Path:
        return self.folder(spec) / f"{c:06d}.json"

    def prepare(self) -> None:
        """Main process, before any scoring: clear the chunks of a label whose reward or layout changed."""
        from smpo_cli.utils.atomic import write_json

        for spec in self.recipe.rewards:
            folder, key = self.folder(spec), self.key(spec)
            key_file = folder / "key.json"
            if key_file.is_file() and json.loads(key_file.read_text(encoding="utf-8")) == key:
                continue
            if folder.exists():
                logger.info("scores of %s were made with other settings: scoring again", spec.prefix)
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            write_json(key_file, key)

    def missing(self, c: int) -> list[PairsRewardSpec]:
        return [s for s in self.recipe.rewards if not self.chunk_file(s, c).is_file()]

    def ready(self, c: int) -> bool:
        first, last = self.chunks[c]
        return all(f.is_file() for f in self.files[first * self.per_prompt : last * self.per_prompt])

    # ------------------------------------------------------------------ scoring
    def _reward(self, spec: PairsRewardSpec):
        if spec.prefix not in self._rewards:
            from smpo_cli.rewards import load_reward
            from smpo_cli.scoring.runner import choose_output
            from smpo_cli.utils.atomic import write_json
            from smpo_cli.utils.devices import resolve_device

            path = spec.path
            if path == "tiny":
                from smpo_cli.rewards.tiny import tiny_reward_path

                path = str(tiny_reward_path(spec.name, build=True))
            reward = load_reward(spec.name, path, device=str(resolve_device(self.recipe.device)), dtype=self.dtype,
                                 batch_size=self.recipe.reward_batch_size, **spec.options)  # fmt: skip
            output = choose_output(spec.output, reward, f"rewards[{spec.prefix}].output")
            known = reward.known_range(output)
            write_json(self.folder(spec) / "reward.json", {"metadata": reward.metadata, "output": output,
                                                           "known_range": list(known) if known else None})  # fmt: skip
            self._rewards[spec.prefix] = (reward, output)
        return self._rewards[spec.prefix]

    def score_chunk(self, c: int) -> None:
        import torch

        from smpo_cli.scoring.decode import open_image
        from smpo_cli.utils.atomic import write_json

        specs = self.missing(c)
        if not specs:
            return
        first, last = self.chunks[c]
        j0, j1 = first * self.per_prompt, last * self.per_prompt
        images = [open_image(f.name, f.parent) for f in self.files[j0:j1]]  # decoded once for every reward
        texts = [self.prompts[j // self.per_prompt] for j in range(j0, j1)]
        with torch.inference_mode():
            for spec in specs:
                reward, output = self._reward(spec)
                values = reward.score(images, texts)[output].double().numpy()
                write_json(self.chunk_file(spec, c), {"first_image": j0, "scores": values.tolist()})

    def score_ready(self, stop: threading.Event) -> None:
        """Score this process's chunks in order as their images appear, until all are done or ``stop`` is set."""
        try:
            for c in self.mine:
                if not self.missing(c):
                    continue
                while not self.ready(c):
                    if stop.is_set():
                        return
                    time.sleep(POLL_SECONDS)
                self.score_chunk(c)
        except BaseException as exc:  # re-raised in the main thread by in_background
            self._error = exc

    @contextmanager
    def in_background(self) -> Iterator[None]:
        """Score chunks in a thread while the body (generation) runs; errors surface when the body ends."""
        stop = threading.Event()
        thread = threading.Thread(target=self.score_ready, args=(stop,), name="smpo-pairs-scorer", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Score what is still missing of this process's chunks (generation has finished)."""
        for c in self.mine:
            self.score_chunk(c)

    # ------------------------------------------------------------------ results
    def collect(self) -> dict[str, LabelScores]:
        """Every chunk's scores (all processes'), per reward label."""
        from smpo_cli.errors import DataError

        result = {}
        for spec in self.recipe.rewards:
            parts = []
            for c in range(len(self.chunks)):
                path = self.chunk_file(spec, c)
                if not path.is_file():
                    raise DataError(f"{path}: scores missing", hint="rerun smpo pairs: scoring resumes")
                parts.append(json.loads(path.read_text(encoding="utf-8"))["scores"])
            info = json.loads((self.folder(spec) / "reward.json").read_text(encoding="utf-8"))
            result[spec.prefix] = LabelScores(np.array([v for p in parts for v in p], dtype=np.float64), info["metadata"],
                                              info["output"], info["known_range"])  # fmt: skip
        return result
