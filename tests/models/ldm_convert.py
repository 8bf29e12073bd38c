"""Test helper: write a diffusers SD1.5 / SDXL pipeline as one original-layout (LDM / SGM) checkpoint.

The inverse of diffusers' ``single_file_utils`` converters, written from the key conventions of
the original Stable Diffusion repos, so that ``from_single_file`` is tested on a real
single-file layout:

* UNet under ``model.diffusion_model.``: ``input_blocks.N.{0 resnet|1 transformer|0.op}``,
  ``middle_block.{0,1,2}``, ``output_blocks.N.{0 resnet|1 transformer|1|2 .conv upsample}``,
  ``time_embed.{0,2}``, ``label_emb.0.{0,2}`` (SDXL), ``out.{0,2}``; resnet parts
  ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``.
* VAE under ``first_stage_model.``: ``{encoder,decoder}.{down,up}.N.block.M``, ``mid.block_{1,2}``,
  ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convs), ``nin_shortcut``, ``norm_out``; decoder
  ``up`` blocks in reverse order.
* SD1.5 text encoder under ``cond_stage_model.transformer.text_model.`` (HF CLIP names).
* SDXL: CLIP-L under ``conditioner.embedders.0.transformer.text_model.``; the second encoder in
  OpenCLIP layout under ``conditioner.embedders.1.model.`` (``transformer.resblocks.N.attn.in_proj_*``
  with q/k/v stacked, ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``, ``positional_embedding``,
  ``token_embedding``, ``ln_final``, ``text_projection`` transposed).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    for diffusers_name, ldm_name in _RESNET:
        if rest.startswith(diffusers_name + "."):
            return ldm_name + rest[len(diffusers_name) :]
    raise KeyError(rest)


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    lpb = config["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{param}"] = value
            continue
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = 1 + b * (lpb + 1) + i
            new = f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = b * (lpb + 1) + i
            new = (
                f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
            )
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            new = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if up_has_attn[b] else 1}.conv.{m[2]}"
        else:
            raise KeyError(f"unet key without an LDM name: {key}")
        out[new] = value
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # LDM uses 1x1 convolutions here
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[new] = value
    return {f"first_stage_model.{k}": v for k, v in out.items()}


def _hf_clip_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 drops the ``text_model.`` level of CLIPTextModel; LDM files keep it."""
    return {
        (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
        for k, v in state.items()
    }


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in _hf_clip_names(state).items() if not k.endswith("position_ids")}


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    state = _hf_clip_names(state)
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    for n in layers:
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{part}"] for p in ("q", "k", "v")], dim=0
            )
            out[f"{dst}attn.out_proj.{part}"] = state[f"{src}self_attn.out_proj.{part}"]
            out[f"{dst}ln_1.{part}"] = state[f"{src}layer_norm1.{part}"]
            out[f"{dst}ln_2.{part}"] = state[f"{src}layer_norm2.{part}"]
            out[f"{dst}mlp.c_fc.{part}"] = state[f"{src}mlp.fc1.{part}"]
            out[f"{dst}mlp.c_proj.{part}"] = state[f"{src}mlp.fc2.{part}"]
    return {f"{prefix}{k}": v for k, v in out.items()}


def pipeline_to_ldm(components, family: str) -> dict[str, torch.Tensor]:
    """State dict of a whole pipeline (``DiffusionComponents`` or pipeline) in the original layout."""
    state = {}
    state.update(unet_to_ldm(components.unet.state_dict(), dict(components.unet.config)))
    state.update(vae_to_ldm(components.vae.state_dict(), dict(components.vae.config)))
    if family == "sd15":
        state.update(clip_to_ldm(components.text_encoder.state_dict(), "cond_stage_model.transformer."))
    else:
        state.update(
            clip_to_ldm(components.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        )
        state.update(
            open_clip_to_ldm(components.text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
        )
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_single_file(components, family: str, path: Path) -> Path:
    save_file(pipeline_to_ldm(components, family), str(path))
    return path
