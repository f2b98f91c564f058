"""Runnable training recipes and their configs, installed as ``lowcomm.recipes``.

``train_lm`` is the recipe ``lowcomm train`` and ``lowcomm join`` run (imported as
``lowcomm.recipes.train_lm``); from a source checkout it also runs as a script,
``torchrun ... recipes/train_lm.py``. ``configs/*.toml`` ship with the package: ``--config
NAME`` picks one by its name (``demo``, ``tiny``), see :func:`lowcomm.config.shipped_configs`.
"""
