"""Stage 2, the k-fold evolutionary search, and the evaluation stages 2 and 3 share: the search and
its random draws (``evolution``, ``draws``), the folds, the candidates' scoring (``evaluation``,
``prefix_scorer``, ``bn_recalibration``), the search's files and its result blocks (``files``,
``results``, ``reference_results``)."""
