"""marker-lab installs like a library: the wheel carries its configs and the toy model, and runs from any directory
with a researcher's own config folder layered on top (examples/my_lab)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; its other packages come from this environment (a .pth
    file), so nothing is downloaded and this checkout is not on its path."""
    tmp = tmp_path_factory.mktemp("install")
    wheel_dir = tmp / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheel_dir)], check=True, cwd=tmp, capture_output=True, timeout=600)
    wheel = next(wheel_dir.glob("marker_lab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "marker_lab/conf/config.yaml" in names and "marker_lab/conf/hydra/launcher/slurm_example.yaml" in names
    assert any(n.startswith("marker_lab/resources/toy_model/") for n in names)
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "dev_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True,
                   timeout=600)
    return env_dir


def run(env_dir: Path, args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MARKER_LAB_CACHE": str(cache), "TQDM_DISABLE": "1", "PYTHONPATH": ""}
    return subprocess.run([str(env_dir / "bin" / "marker-lab"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_installed_wheel_runs_a_cell_and_a_users_preset_from_elsewhere(installed, tmp_path, cache_dir):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import marker_lab, marker_lab.core.files as f; "
                            "print(marker_lab.__file__); print(f.CONF)"], capture_output=True, text=True, cwd=tmp_path)
    package, conf = where.stdout.split()
    assert str(installed) in package and conf.startswith(str(installed)) and str(ROOT) not in package + conf

    cell = run(installed, ["run", "persona_set.eval_personas=[villain]", "eval.generation.samples_per_question=1",
                           f"hydra.run.dir={tmp_path / 'cell'}"], tmp_path, cache_dir)
    assert cell.returncode == 0, cell.stderr[-3000:]
    assert (tmp_path / "cell" / "run_result.json").is_file() and (tmp_path / "cell" / "run.log").is_file()

    sweep = run(installed, ["run", "-m", "--config-dir", str(ROOT / "examples" / "my_lab"), "+experiment=my_first_sweep",
                            "hydra/launcher=my_workstation", "persona_set.eval_personas=[villain]",
                            f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, cache_dir)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    status = run(installed, ["status", str(tmp_path / "sweep")], tmp_path, cache_dir)
    assert status.returncode == 0 and "2 cells: 2 complete" in status.stdout, status.stdout + status.stderr
    assert (tmp_path / "sweep" / "aggregate" / "report.md").is_file()
