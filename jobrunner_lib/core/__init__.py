"""The pure core: the job model and its state machine, errors, configuration, IDs, weights,
output ownership and privacy, logging, the backend flags. Imports nothing else of jr.
"""
