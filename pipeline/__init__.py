"""Stages of the chest-radiograph VAE-GAN pipeline (ingest, train, ...) and the CLI."""
