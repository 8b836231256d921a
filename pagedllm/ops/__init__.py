"""Native kernels for the hot path, each with a pure-PyTorch twin that tests compare it to."""
