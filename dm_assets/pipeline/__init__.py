"""Orchestration: experiments (YAML), the Dagster asset graph, its resources and jobs.

Only this layer imports dagster and mlflow; it wires the science layer (``store``, ``training``,
``regression``, ``evaluation``) into assets.
"""
