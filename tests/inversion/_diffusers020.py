"""diffusers 0.20.0's ``DDIMInverseScheduler`` (set_timesteps and step), transcribed for the official-loop tests.

The official SmPO code pins diffusers 0.20.0, which cannot be installed next to the diffusers smpo uses,
so this is a line-by-line transcription of ``diffusers/schedulers/scheduling_ddim_inverse.py`` at 0.20.0
(float32 betas and cumulative products, the rolled timesteps, ``step`` from ``t`` to ``t + T // n``),
without the parts the official loop does not touch (eta, variance noise, the linear / cosine beta
schedules). It imports nothing from smpo.

Checked against the real 0.20.0 class: ``pip install --no-deps --target /tmp/d020 diffusers==0.20.0``
(plus ``huggingface_hub==0.16.4`` into /tmp/hf016, and ``transformers`` hidden from it), then comparing
``timesteps`` and ``step`` outputs on random tensors for the SD1.5 and SDXL scheduler configs and the
tiny models' configs, 5 and 10 steps: identical (max abs difference 0.0).
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULTS = {  # DDIMInverseScheduler.__init__ defaults in 0.20.0
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
    "prediction_type": "epsilon", "clip_sample_range": 1.0, "timestep_spacing": "leading",
}  # fmt: skip


class DDIMInverseScheduler020:
    def __init__(self, file_config: dict) -> None:
        """``DDIMInverseScheduler.from_pretrained`` on a scheduler_config.json holding ``file_config``."""
        self.config = {**DEFAULTS, **{k: v for k, v in file_config.items() if k in DEFAULTS}}
        c = self.config
        if c["beta_schedule"] == "scaled_linear":
            self.betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"], dtype=torch.float32) ** 2
        elif c["beta_schedule"] == "linear":
            self.betas = torch.linspace(c["beta_start"], c["beta_end"], c["num_train_timesteps"], dtype=torch.float32)
        else:
            raise NotImplementedError(c["beta_schedule"])
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.initial_alpha_cumprod = torch.tensor(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, c["num_train_timesteps"]).copy().astype(np.int64))

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        self.num_inference_steps = num_inference_steps
        if c["timestep_spacing"] == "leading":
            step_ratio = c["num_train_timesteps"] // self.num_inference_steps
            timesteps = (np.arange(0, num_inference_steps) * step_ratio).round().copy().astype(np.int64)
            timesteps += c["steps_offset"]
        elif c["timestep_spacing"] == "trailing":
            step_ratio = c["num_train_timesteps"] / self.num_inference_steps
            timesteps = np.round(np.arange(c["num_train_timesteps"], 0, -step_ratio)[::-1]).astype(np.int64)
            timesteps -= 1
        else:
            raise ValueError(c["timestep_spacing"])
        timesteps = np.roll(timesteps, 1)
        timesteps[0] = int(timesteps[1] - step_ratio)
        self.timesteps = torch.from_numpy(timesteps)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
        c = self.config
        prev_timestep = timestep + c["num_train_timesteps"] // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep] if timestep >= 0 else self.initial_alpha_cumprod
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep]
        beta_prod_t = 1 - alpha_prod_t
        if c["prediction_type"] == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            pred_epsilon = model_output
        elif c["prediction_type"] == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        elif c["prediction_type"] == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        else:
            raise ValueError(c["prediction_type"])
        if c["clip_sample"]:
            pred_original_sample = pred_original_sample.clamp(-c["clip_sample_range"], c["clip_sample_range"])
        pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * pred_epsilon
        return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
