"""The network: model families built from shared layers, and the weight loaders."""
