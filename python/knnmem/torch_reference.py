"""The pure-torch implementation of the knnmem ring (add and strided-bin search):
the documented path of knnmem.torch._reference, where it lives (its docstring has
the details). knnmem.torch's ops run it where the C++ core and the CUDA kernels do
not serve a tensor; the tests use it as their reference."""

from .torch._reference import add, placement, search

__all__ = ["placement", "add", "search"]
