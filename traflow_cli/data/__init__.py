"""Datasets: exact toy 2-D distributions and image datasets, all as float tensors in model range."""

from traflow_cli.data.toy import TOY_DISTRIBUTIONS, sample_toy

__all__ = ["TOY_DISTRIBUTIONS", "sample_toy"]
