"""Tensors live here: the KV pools, the batch the model runs on, and sampling."""
