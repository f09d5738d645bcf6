"""Measuring accuracy on labelled data: simulated clicks, datasets and their
splits, AJI/PQ metrics, the evaluation run and the watershed baseline.
"""
