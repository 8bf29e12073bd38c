"""``smpo bench``: reward benchmarks of a model against a baseline, with win rates and a report."""
