"""``smpo pairs``: preference pairs from your own prompts, several reward models and a smoothed p.

``pairing`` holds the pure functions (normalisation, mixture, strategies); ``runner`` composes
``smpo generate``'s sampling and the reward models' scoring into the scored-pairs format.
"""
