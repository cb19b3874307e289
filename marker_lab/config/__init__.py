"""The config schemas: typed dataclasses (and enums for every choice field) that Hydra composes conf/ into."""
