"""dm_assets: datamodels (Ilyas et al., 2022) computed as a Dagster data-asset pipeline.

The science layer (``spec``, ``store``, ``worker``, ``regression``) imports neither dagster nor
mlflow; the orchestration layer sits on top of it.
"""

__version__ = "0.1.0"
