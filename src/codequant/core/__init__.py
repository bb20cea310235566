"""The runtime core: what kernels, modules, checkpoints and calibration all need.

``format``       the packed weight format (indices at the bit width, per-row codebooks, row sums)
``activations``  per-token integer activation quantization (``ActQuantSpec``)
``hadamard``     block Hadamard rotations
``swiglu``       the experts' SwiGLU h = silu(x W_g^T) * (x W_u^T)

Everything else in the package may import from here; nothing here imports from the rest.
"""
