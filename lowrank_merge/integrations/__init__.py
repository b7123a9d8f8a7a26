"""CART and the SVD baselines inside the toolkits people already use.

* :mod:`lowrank_merge.integrations.mergekit`: importing it registers ``cart``,
  ``tsv``, ``iso_c`` and ``iso_cts`` as mergekit (0.1.5) merge methods; the
  ``lowrank-mergekit`` console script runs mergekit's YAML CLI with them.
* :mod:`lowrank_merge.integrations.fusion_bench`: FusionBench algorithm
  classes (``CARTAlgorithm``, ``LowRankMergeAlgorithm``) and their YAML config.
* :mod:`lowrank_merge.integrations.peft`: per-tensor functions in the shape of
  ``peft.utils.merge_utils`` (``cart``, ``tsv``, ``iso_c``, ``iso_cts``) for
  LoRA and adapter code; needs nothing but torch.

Each toolkit is imported only by its own module, so ``lowrank_merge`` itself
never depends on them.
"""
