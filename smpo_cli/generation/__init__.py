"""``smpo generate``: images from a model on a prompt set, each traceable to its prompt, seed and settings."""
