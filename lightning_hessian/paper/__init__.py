"""The reproduction of Sagun et al. 2017 ("Empirical Analysis of the Hessian of Over-Parametrized Neural Networks").

Data (:mod:`~lightning_hessian.paper.data`), models (:mod:`~lightning_hessian.paper.models`), the
training loop (:mod:`~lightning_hessian.paper.training`), the measurements
(:mod:`~lightning_hessian.paper.spectra`), the experiments (:mod:`~lightning_hessian.paper.experiments`,
:mod:`~lightning_hessian.paper.sblb`) and the report (:mod:`~lightning_hessian.paper.report`). It uses
the engine and the Lightning face of the package; nothing in them imports it.
"""
