"""What every reward model shares: the interface, image conversion, batching, dtype/device, asset lookup.

A reward model maps ``(images, prompts)`` to one or more named scores per image. ``score`` returns
``{output_name: float32 CPU tensor of shape (N,)}``; ``default_output`` names the one a caller gets
when it does not choose. ``score_pairs`` scores two images per prompt (a preference pair); for the
CLIP-like models (:class:`EmbeddingRewardModel`) each prompt is encoded once per pair and both
images go through the image tower in one batch.

Images are converted to RGB here, once, for every model (:func:`to_rgb`), before the model's own
preprocessing. Weights are only ever read with safetensors, ``from_pretrained`` or
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from smpo_cli.errors import AssetNotFoundError, DataError, ModelLoadError, UsageError
from smpo_cli.utils.devices import resolve_device
from smpo_cli.utils.devices import resolve_dtype as _resolve_dtype
from smpo_cli.utils.logging import get_logger

logger = get_logger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)



# ----------------------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image.

    Grayscale (``L``, ``1``), palette (``P``, with or without transparency), ``RGBA``/``LA``
    (alpha dropped, as ``Image.convert("RGB")`` does in every reference implementation), ``CMYK``
    and ``YCbCr`` go through PIL's own conversion. 16-bit grayscale (``I;16``) is scaled to 8 bits
    first (PIL would clip it).
    """
    if not isinstance(image, Image.Image):
        raise DataError(
            f"expected a PIL image, got {type(image).__name__}",
            hint="open files with PIL.Image.open(path) before scoring",
        )
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        import numpy as np

        arr = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((arr // 257).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise DataError(f"cannot convert a {image.mode} image to RGB: {e}") from e


def _as_prompt_list(prompts: Sequence[str] | str | None, n: int, *, required: bool) -> list[str]:
    if prompts is None:
        if required:
            raise DataError("this reward model needs one prompt per image, got none")
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise DataError(
            f"got {n} images but {len(prompts)} prompts; pass one prompt per image (or one string)"
        )
    for p in prompts:
        if not isinstance(p, str):
            raise DataError(f"prompts must be strings, got {type(p).__name__}")
    return prompts


# ------------------------------------------------------------------------------------ dtype/device


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A reward model's dtype; "auto" is float16 on CUDA and float32 elsewhere."""
    return _resolve_dtype(dtype, device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------ the interface


class RewardModel:
    """Base class of every reward model.

    Subclasses set the class attributes, load their modules in ``__init__`` and implement
    :meth:`_score_batch`. Instances are created by :func:`smpo_cli.rewards.load_reward`.

    Attributes:
        name: registry name (``"pickscore"``, ``"hpsv2"``, ...).
        version: checkpoint and variant, e.g. ``"PickScore_v1"`` or ``"HPSv2.1"``.
        higher_is_better: every model here: True.
        output_names: names of the tensors :meth:`score` returns.
        default_output: the output a caller gets when it does not choose one.
        uses_prompt: False for prompt-free models (aesthetic); their ``prompts`` may be None.
    """

    name: ClassVar[str] = ""
    output_names: ClassVar[tuple[str, ...]] = ("score",)
    default_output: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True
    uses_prompt: ClassVar[bool] = True

    def __init__(
        self,
        *,
        version: str,
        source: str,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        batch_size: int = 32,
    ) -> None:
        if int(batch_size) < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.version = version
        self.source = str(source)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = int(batch_size)

    # -- what subclasses implement -------------------------------------------------------------

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Score one batch of RGB images; return every name of ``output_names``."""
        raise NotImplementedError

    def _extra_metadata(self) -> dict[str, Any]:
        return {}

    def known_range(self, output: str) -> tuple[float, float] | None:
        """(min, max) of ``output`` that SmPO's min-max normalisation should use, when the model defines one."""
        return None

    # -- public API ----------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-able description of what produced the scores (stored next to them)."""
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "outputs": list(self.output_names),
            "default_output": self.default_output,
            "higher_is_better": self.higher_is_better,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            **self._extra_metadata(),
        }

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str] | str | None = None,
        *,
        batch_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score ``images[i]`` against ``prompts[i]``.

        ``prompts`` may be one string (used for every image). Returns one float32 CPU tensor of
        shape ``(len(images),)`` per name in :attr:`output_names`.
        """
        images = list(images)
        prompts = _as_prompt_list(prompts, len(images), required=self.uses_prompt)
        bs = int(batch_size or self.batch_size)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.output_names}
        with torch.inference_mode():
            for start in range(0, len(images), bs):
                rgb = [to_rgb(im) for im in images[start : start + bs]]
                self._collect(parts, self._score_batch(rgb, prompts[start : start + bs]))
        return self._finish(parts)

    def score_pairs(
        self,
        images_a: Sequence[Image.Image],
        images_b: Sequence[Image.Image],
        prompts: Sequence[str] | str | None = None,
        *,
        batch_size: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Score preference pairs: ``(score(images_a, prompts), score(images_b, prompts))``.

        The default scores the concatenation ``images_a + images_b`` (what a model whose text
        encoder looks at the image, such as ImageReward, has to do); CLIP-like models override this
        to encode each prompt once per pair.
        """
        images_a, images_b = list(images_a), list(images_b)
        if len(images_a) != len(images_b):
            raise DataError(f"pair lists differ in length: {len(images_a)} vs {len(images_b)}")
        n = len(images_a)
        prompts = _as_prompt_list(prompts, n, required=self.uses_prompt)
        both = self.score(images_a + images_b, prompts + prompts, batch_size=batch_size)
        return {k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version!r}, device={self.device}, dtype={dtype_name(self.dtype)})"

    # -- helpers for subclasses ----------------------------------------------------------------

    def _place(self, module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        module.to(device=self.device, dtype=dtype or self.dtype)
        module.eval()
        module.requires_grad_(False)
        return module

    def _collect(self, parts: dict[str, list[torch.Tensor]], out: dict[str, torch.Tensor]) -> None:
        for k in self.output_names:
            parts[k].append(out[k].detach().reshape(-1).to(device="cpu", dtype=torch.float32))

    def _finish(self, parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float32) for k, v in parts.items()}


class EmbeddingRewardModel(RewardModel):
    """A CLIP-like model: score = f(image embedding, text embedding), towers independent.

    Subclasses implement ``_encode_images`` (``(n, d)`` tensor), ``_encode_texts`` (``(n, d)``
    tensor, or None for prompt-free models) and ``_combine``; scoring pairs then encodes each prompt
    once and both images of a pair in the same image batch.
    """

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def _encode_texts(self, prompts: list[str]) -> torch.Tensor | None:
        raise NotImplementedError

    def _combine(self, image_emb: torch.Tensor, text_emb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        return self._combine(self._encode_images(images), self._encode_texts(prompts))

    def score_pairs(
        self,
        images_a: Sequence[Image.Image],
        images_b: Sequence[Image.Image],
        prompts: Sequence[str] | str | None = None,
        *,
        batch_size: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        images_a, images_b = list(images_a), list(images_b)
        if len(images_a) != len(images_b):
            raise DataError(f"pair lists differ in length: {len(images_a)} vs {len(images_b)}")
        n = len(images_a)
        prompts = _as_prompt_list(prompts, n, required=self.uses_prompt)
        # A batch holds `pairs` pairs, i.e. at most batch_size images through the image tower.
        pairs = max(1, int(batch_size or self.batch_size) // 2)
        parts_a: dict[str, list[torch.Tensor]] = {k: [] for k in self.output_names}
        parts_b: dict[str, list[torch.Tensor]] = {k: [] for k in self.output_names}
        with torch.inference_mode():
            for start in range(0, n, pairs):
                a = [to_rgb(im) for im in images_a[start : start + pairs]]
                b = [to_rgb(im) for im in images_b[start : start + pairs]]
                text = self._encode_texts(prompts[start : start + pairs])
                emb = self._encode_images(a + b)
                self._collect(parts_a, self._combine(emb[: len(a)], text))
                self._collect(parts_b, self._combine(emb[len(a) :], text))
        return self._finish(parts_a), self._finish(parts_b)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` along the last dim, in float32; a zero vector stays zero."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


# ------------------------------------------------------------------------------------------ heads


def linear_head_from_state_dict(state: dict[str, torch.Tensor], prefix: str) -> torch.nn.Sequential:
    """The 5-Linear MLP of ImageReward and the LAION aesthetic predictor, sized from its weights.

    ``Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear`` (keys ``0, 2, 4, 6, 7``),
    no activations, exactly as both references define it (their ReLUs are commented out). Loaded
    with ``strict=True``.
    """
    from torch import nn

    idx = (0, 2, 4, 6, 7)
    try:
        shapes = [tuple(state[f"{prefix}{i}.weight"].shape) for i in idx]
    except KeyError as e:
        raise ModelLoadError(f"reward head weights lack {e.args[0]!r}") from e
    drops = (0.2, 0.2, 0.1)
    layers: list[nn.Module] = []
    for j, (out_f, in_f) in enumerate(shapes):
        layers.append(nn.Linear(in_f, out_f))
        if j < 3:
            layers.append(nn.Dropout(drops[j]))
    head = nn.Sequential(*layers)
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        head.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"reward head does not match the 5-Linear layout: {e}") from e
    return head


# ----------------------------------------------------------------------------------------- assets

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` (or a legacy bare ``name``) that is not an existing local path."""
    s = str(source)
    return bool(_HUB_ID.match(s)) and ".." not in s and not Path(s).expanduser().exists()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def download_hint(repo_id: str, filename: str | None = None) -> str:
    """One line telling the user how to get ``repo_id`` (``hf`` CLI, or ``huggingface-cli`` before 1.0)."""
    try:
        import huggingface_hub

        major = int(huggingface_hub.__version__.split(".")[0])
    except Exception:  # pragma: no cover - huggingface_hub is a transformers dependency
        major = 1
    cli = "hf download" if major >= 1 else "huggingface-cli download"
    what = f"{repo_id} {filename}" if filename else repo_id
    return f"pass a local path, or on a machine with internet access run `{cli} {what} --local-dir DIR` and pass DIR"


def resolve_file(source: str | os.PathLike[str], filenames: Sequence[str], *, what: str) -> Path:
    """Find a weights file: a local file, a local folder holding one of ``filenames``, or a hub repo.

    Hub repos are looked up in the local cache first (no network when cached); only when missing
    and not ``HF_HUB_OFFLINE`` is ``filenames[0]`` downloaded.
    """
    src = str(source)
    path = Path(src).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise AssetNotFoundError(
            f"{what}: {path} holds none of {', '.join(filenames)}",
            hint="pass the checkpoint file itself, or a folder that holds it",
        )
    if not looks_like_hub_id(src):
        raise AssetNotFoundError(f"{what}: no such file or folder: {src}", hint="check the path")
    from huggingface_hub import hf_hub_download

    filename = filenames[0]
    try:
        return Path(hf_hub_download(src, filename, local_files_only=True))
    except Exception as cached_err:  # not cached (or a broken cache entry)
        if hub_offline():
            raise AssetNotFoundError(
                f"{what}: {src}/{filename} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                hint=download_hint(src, filename),
            ) from cached_err
    try:
        logger.info("downloading %s/%s from the Hugging Face Hub", src, filename)
        return Path(hf_hub_download(src, filename))
    except (OSError, ValueError) as e:
        raise AssetNotFoundError(
            f"{what}: cannot find or download {src}/{filename} ({_first_line(e)})",
            hint=download_hint(src, filename),
        ) from e


def hf_from_pretrained(loader: Callable[..., Any], source: str, *, what: str, **kwargs: Any) -> Any:
    """``loader(source, **kwargs)`` for a transformers ``from_pretrained``, with smpo's errors.

    A local folder is read with ``local_files_only=True`` (failures are :class:`ModelLoadError`);
    a hub id is taken from the cache first, then downloaded unless offline (failures are
    :class:`AssetNotFoundError` with a download hint).
    """
    path = Path(str(source)).expanduser()
    if path.is_dir():
        try:
            return loader(str(path), local_files_only=True, **kwargs)
        except Exception as e:
            raise ModelLoadError(f"cannot load {what} from {path}: {_first_line(e)}") from e
    if path.exists():
        raise ModelLoadError(f"{what}: {path} is a file; expected a folder written by save_pretrained")
    if not looks_like_hub_id(str(source)):
        raise AssetNotFoundError(f"{what}: no such folder: {source}", hint="check the path")
    try:
        return loader(str(source), local_files_only=True, **kwargs)
    except OSError as cached_err:
        from smpo_cli.models.loading import hub_reachable

        if hub_offline() or not hub_reachable():  # unreachable: fail now, not after ~30 s of retries
            why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
            raise AssetNotFoundError(
                f"{what}: {source} is not in the local Hugging Face cache and {why}",
                hint=download_hint(str(source)),
            ) from cached_err
    try:
        return loader(str(source), **kwargs)
    except OSError as e:
        raise AssetNotFoundError(
            f"{what}: cannot find or download {source} ({_first_line(e)})", hint=download_hint(str(source))
        ) from e


def refuse_missing_weights(
    model_and_info: tuple[Any, dict[str, Any]], what: str, source: str, *, ignore: Callable[[str], bool], hint: str
) -> Any:
    """The model of ``from_pretrained(..., output_loading_info=True)``; ModelLoadError if weights are missing.

    transformers initialises missing weights randomly and only warns; a reward or judge model must not.
    ``ignore`` names keys that may legitimately be absent (buffers, training-only heads).
    """
    model, info = model_and_info
    missing = sorted(k for k in info.get("missing_keys", []) if not ignore(k))
    if missing:
        raise ModelLoadError(
            f"{what} at {source} lacks {len(missing)} weights (e.g. {missing[0]}); refusing random initialisation",
            hint=hint,
        )
    return model


def load_state_dict_file(path: Path, *, what: str) -> dict[str, Any]:
    """Read a checkpoint: ``.safetensors`` with safetensors, anything else with ``weights_only=True``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise ModelLoadError(
            f"cannot read {what} from {path}: {_first_line(e)}",
            hint="smpo only reads tensors (safetensors, or torch.load with weights_only=True)",
        ) from e


def read_json(path: Path, *, what: str) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {what} from {path}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def pil_backend_kwargs() -> dict[str, Any]:
    """Ask ``AutoProcessor`` for the PIL image path (the references' numerics), on transformers 4 and 5."""
    return {"backend": "pil"} if transformers_major() >= 5 else {"use_fast": False}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load-time reports and progress bars at ERROR level only (smpo checks the loads)."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()
