"""A synthetic experiment with a known answer: each "model" is a planted sparse linear datamodel
plus noise, so the fitted datamodels can be checked against the truth."""
