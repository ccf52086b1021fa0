"""Execution: training models into a store.

``runner`` is the worker's implementation (one process trains indices through the user's
``main(index, logdir)`` and commits their rows); ``launcher`` is the core every launcher shares
(rounds of worker processes, retries, reports); ``local`` and ``slurm`` are its transports
(worker processes on this machine's device slots, SLURM job arrays); ``devices`` finds and
leases the devices.
"""
