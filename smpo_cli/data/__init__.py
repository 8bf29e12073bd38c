"""Small datasets smpo makes itself (no network): the quick start's preference pairs."""
