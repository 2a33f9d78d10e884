"""Training the restoration network (paper section 3.3, 4.2): ``config`` (the JSON run configuration),
``data`` (CUFED, CUFED5, self-reference pairs, the resumable sampler), ``losses``, ``distributed``
(torchrun / DDP), ``state`` (checkpoints that resume bitwise), ``loop`` (:func:`train`)."""
