"""Experiment sweeps: a grid of runs (``airlora sweep``) and the paper's tables and figures from them
(``airlora report``)."""
