"""`ftcot tune`'s parts: the search-space grammar (space.py), the trial function Ray Tune runs
(trial.py), the Tuner's wiring (search.py), the trials table, plots and study (results.py) and the
registry of best students (registry.py). The recipe that strings them together is
ftcot_ray/stages/tune.py. Nothing here is imported by config.py except the pure grammar.
"""
