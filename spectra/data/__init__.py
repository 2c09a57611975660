"""Datasets: CounterFact / ZsRE / general-ability loaders and the tiny-world generator."""
