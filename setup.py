"""Packaging hook: the wheel carries conf/ as marker_lab/conf, so an installed marker-lab finds its configs through
the package (conf/ stays the one source in the repository; editable installs read it in place)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "marker_lab" / "conf"
        shutil.copytree(Path(__file__).parent / "conf", target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConf})
