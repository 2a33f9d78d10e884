"""The package's main job (``make demo``): CFE-PatchMatch against enumerated matching on a real RefSR pair,
and the convergence study behind the paper's Fig. 5. ``pair`` (the pair and its true geometry),
``features`` (the fixed filter-bank extractor), ``convergence`` (curves vs enumerated matching), ``table``,
``plots``, ``run`` (:func:`run_demo`)."""
