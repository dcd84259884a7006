"""Recommender models on fastmf's fused layers."""

from fastmf.models.svdpp import SVDpp, TimeSVDpp

__all__ = ["SVDpp", "TimeSVDpp"]
