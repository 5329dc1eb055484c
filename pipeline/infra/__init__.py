"""Shared infrastructure of the stages: config loading and the stage configs, runtime set-up and
the training engine, checkpoints and model loading, MLflow tracking, data sets, metrics, sample
quality, plots, CPU speed measures and data-parallel set-up. Nothing here imports a stage."""
