"""The stages of the daily pipeline, one module per concern; `pipelines.daily` wires them."""
