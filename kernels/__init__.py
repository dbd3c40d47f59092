"""Triton kernels, each with its autograd wrapper and a plain-PyTorch reference of the same math.

Modules never call a kernel directly: they call the dispatch function of a kernel file
(`backend="triton" | "reference" | ...`), so the whole repo runs without a GPU.
"""
