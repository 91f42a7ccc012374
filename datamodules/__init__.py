"""LightningDataModules of spr_lightning: region queries, candidate and pair shards, grounding benchmarks.

Import the modules directly (``datamodules.preference.PreferenceDataModule``): importing this package
loads nothing heavy.
"""
