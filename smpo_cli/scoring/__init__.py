"""``smpo score``: reward scores and smoothed preference labels for preference-pair datasets."""
