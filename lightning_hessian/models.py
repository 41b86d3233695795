"""Deprecated location of :mod:`lightning_hessian.paper.models`, kept for one release.

Configs that name classes as ``lightning_hessian.models.<Name>`` still load, with a
``DeprecationWarning``; write ``lightning_hessian.paper.models.<Name>`` instead.
"""

from lightning_hessian._deprecation import moved_module

__getattr__ = moved_module("lightning_hessian.models", "lightning_hessian.paper.models")
