"""The digits miniature: a CPU-sized stand-in for Stable Diffusion and its AI feedback, from real handwritten digits.

Everything here exists only for the miniature, and nothing outside this package imports it
(``tests/test_import_layers.py`` checks it): the data (:mod:`~lightning_sdrl.digits.data`,
:mod:`~lightning_sdrl.digits.captions`, :mod:`~lightning_sdrl.digits.preferences`), the
pretrained text-to-image policies (:mod:`~lightning_sdrl.digits.policy`, DDIM;
:mod:`~lightning_sdrl.digits.flow_policy`, flow matching) and their pretraining
(:mod:`~lightning_sdrl.digits.pretrain`), the feedback models (:mod:`~lightning_sdrl.digits.models`,
trained by :mod:`~lightning_sdrl.digits.train_digits`) and their reward-side wrappers
(:mod:`~lightning_sdrl.digits.classifier`, :mod:`~lightning_sdrl.digits.features`,
:mod:`~lightning_sdrl.digits.embedder`), the reference sets (:mod:`~lightning_sdrl.digits.reference`),
and the shipped weights (``assets/``). Configs select its classes by full class path
(``configs/digits/``).
"""
