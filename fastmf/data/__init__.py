"""Data layer: interactions in one index space, train/test splits, negative sampling.

>>> from fastmf.data import Interactions, leave_one_out, sample_negatives
>>> data = Interactions.from_csv("ml-latest-small/ratings.csv")  # doctest: +SKIP
>>> train, test = leave_one_out(data, by="time")  # doctest: +SKIP
>>> negatives = sample_negatives(train, test.users, 99, seed=0, replace=False)  # doctest: +SKIP
"""

from fastmf.data.features import Features, feature_hash
from fastmf.data.interactions import IdMap, Interactions
from fastmf.data.sampling import NegativeSampler, popularity, sample_negatives
from fastmf.data.splits import kfold, leave_one_out, random_split, temporal_split

__all__ = [
    "Features",
    "IdMap",
    "Interactions",
    "NegativeSampler",
    "feature_hash",
    "kfold",
    "leave_one_out",
    "popularity",
    "random_split",
    "sample_negatives",
    "temporal_split",
]
