"""Hydra instantiates launchers and sweepers only from the `hydra_plugins` namespace; the code is in
marker_lab.launch. Configs: marker_lab.config.schema (hydra/launcher=local_gpus|slurm, hydra/sweeper=grid)."""

from marker_lab.launch import launchers as _launchers
from marker_lab.launch import sweeper as _sweeper


class LocalGpusLauncher(_launchers.LocalGpusLauncher):
    pass


class SlurmArrayLauncher(_launchers.SlurmArrayLauncher):
    pass


class GridSweeper(_sweeper.GridSweeper):
    pass
