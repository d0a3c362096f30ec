"""``nemo-guide experiment``: grids of training runs and their report (:mod:`.grid`, :mod:`.runner`, :mod:`.job`, :mod:`.report`)."""
