"""Deprecated location of :mod:`lightning_hessian.paper.data`, kept for one release.

Configs that name classes as ``lightning_hessian.data.<Name>`` still load, with a
``DeprecationWarning``; write ``lightning_hessian.paper.data.<Name>`` instead.
"""

from lightning_hessian._deprecation import moved_module

__getattr__ = moved_module("lightning_hessian.data", "lightning_hessian.paper.data")
