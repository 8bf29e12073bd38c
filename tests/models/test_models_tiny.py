"""The embedded tiny models: tokenizer files, deterministic builders, materialisation on disk."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from smpo_cli.models import tiny
from smpo_cli.models.tiny import (
    BUILDER_VERSION,
    PROMPT_WORDS,
    TINY_MODELS,
    TOKENIZER_DIR,
    build_tiny_components,
    is_materialized,
    load_tiny_tokenizer,
    materialize_tiny,
    tokenizer_files,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# --- tokenizer ------------------------------------------------------------------------------


def test_shipped_tokenizer_files_equal_the_generator():
    # If this fails after changing PROMPT_WORDS or the generator, regenerate the files with
    #   python -m smpo_cli.models.tiny --write-tokenizer smpo_cli/models/assets/tiny_clip_tokenizer
    # and bump BUILDER_VERSION.
    expected = tokenizer_files()
    shipped = {p.name: p.read_text(encoding="utf-8") for p in TOKENIZER_DIR.iterdir() if p.is_file()}
    assert sorted(shipped) == sorted(expected) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    for name, text in expected.items():
        assert shipped[name] == text, f"{name} differs from tokenizer_files()"


def test_write_tokenizer_command(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "smpo_cli.models.tiny", "--write-tokenizer", str(tmp_path / "tok")],
        check=True,
        cwd=REPO_ROOT,
    )
    for name, text in tokenizer_files().items():
        assert (tmp_path / "tok" / name).read_text(encoding="utf-8") == text


def test_vocab_layout_is_clip_bpe():
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    tokens = sorted(vocab, key=vocab.get)
    assert list(vocab.values()) == list(range(len(vocab)))
    assert tokens[:256] == list(tiny._bytes_to_unicode().values())
    assert tokens[256:512] == [t + "</w>" for t in tokens[:256]]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    for line in merges[1:]:
        a, b = line.split(" ")
        assert a + b in vocab


def test_prompt_words_are_single_tokens_and_anything_tokenizes():
    tok = load_tiny_tokenizer()
    assert tok.model_max_length == 77
    for word in PROMPT_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    text = "A photo of an astronaut riding a horse, Übermensch 日本 zxqv 4k!!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1]  # no unknown token: unknown words fall back to bytes
    assert (
        tok.decode(ids, skip_special_tokens=True)
        == "a photo of an astronaut riding a horse , übermensch 日本 zxqv 4 k !!"
    )
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77
    assert load_tiny_tokenizer(pad_token="!").pad_token_id == 0


# --- builders -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_MODELS)
def test_builders_are_deterministic_and_leave_the_rng_alone(name):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_components(name)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG untouched
    second = build_tiny_components(name)
    modules = [k for k, v in first.items() if isinstance(v, torch.nn.Module)]
    assert set(modules) >= {"unet", "vae", "text_encoder"}
    for key in modules:
        a, b = first[key].state_dict(), second[key].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), key


def test_sdxl_shapes_follow_diffusers():
    c = build_tiny_components("tiny-sdxl")
    unet = c["unet"].config
    assert unet.addition_embed_type == "text_time"
    hidden = c["text_encoder"].config.hidden_size + c["text_encoder_2"].config.hidden_size
    assert unet.cross_attention_dim == hidden
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + (
        c["text_encoder_2"].config.projection_dim
    )
    assert type(c["scheduler"]).__name__ == "EulerDiscreteScheduler"
    assert c["scheduler"].config.beta_schedule == "scaled_linear"
    assert c["scheduler"].config.prediction_type == "epsilon"
    assert c["tokenizer_2"].pad_token == "!"


# --- materialisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"), [("tiny-sd15", "StableDiffusionPipeline"), ("tiny-sdxl", "StableDiffusionXLPipeline")]
)
def test_materialize_writes_the_diffusers_format(tiny_dirs, smpo_cache, name, cls):
    path = tiny_dirs[name.removeprefix("tiny-")]
    assert path == smpo_cache / "models" / f"{name}-v{BUILDER_VERSION}"
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == cls
    models = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if name == "tiny-sdxl" else [])
    for sub in models:
        assert (path / sub / "config.json").is_file()
        assert list((path / sub).glob("*.safetensors")), sub
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pkl"))
    assert (path / "scheduler" / "scheduler_config.json").is_file()
    assert is_materialized(path)


def test_materialize_reuses_and_repairs(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SMPO_CACHE", str(tmp_path / "cache"))
    path = materialize_tiny("tiny-sd15")
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert materialize_tiny("tiny-sd15") == path
    assert weights.stat().st_mtime_ns == stamp  # reused, not rebuilt
    weights.unlink()  # an incomplete folder (e.g. someone deleted a file) is rebuilt
    assert not is_materialized(path)
    assert materialize_tiny("tiny-sd15") == path
    assert is_materialized(path)
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == [path.name]


def test_materialize_concurrent_callers_build_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SMPO_CACHE", str(tmp_path / "cache"))
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker():
        try:
            results.append(materialize_tiny("tiny-sd15"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with caplog.at_level(logging.INFO, logger="smpo_cli.models.tiny"):
        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(set(results)) == 1 and is_materialized(results[0])
    assert sum("materialised" in r.getMessage() for r in caplog.records) == 1


def test_unknown_tiny_name():
    from smpo_cli.errors import AssetNotFoundError

    with pytest.raises(AssetNotFoundError, match="tiny-sd9"):
        materialize_tiny("tiny-sd9")


def test_tiny_module_imports_no_torch():
    code = "import sys, smpo_cli.models.tiny, smpo_cli.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
