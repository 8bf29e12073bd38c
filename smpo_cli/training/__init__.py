"""``smpo train``: SmPO, Diffusion-DPO and SFT on scored preference pairs."""
