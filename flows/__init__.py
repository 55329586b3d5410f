"""Prefect orchestration of the pipeline: flows only compose ``tasks.pipeline.run_stage``.

``flows.ast_pipeline`` runs the five stages for one params file; ``flows.compare``
runs every method side by side on one prepared data set and one teacher cache.
Nothing here computes anything itself, so the CLI, Prefect and DVC stay one
code path.
"""
