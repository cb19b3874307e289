"""Every use of Hydra's private API (anything under `hydra._internal`, or named with a leading underscore) and of its
global state, in one place: a Hydra upgrade is checked here and nowhere else (tests/test_environment.py holds the
rest of the code to that).

Checked against hydra-core 1.3.8 (hydra/main.py, hydra/_internal/utils.py, hydra/_internal/core_plugins/
basic_sweeper.py, hydra/core/utils.py, hydra/core/hydra_config.py). What each name below relies on:

- `run_app`: hydra.main's body (`decorated_main`, hydra/main.py) on an explicit argument list: Hydra's argument
  parser (`hydra._internal.utils.get_args_parser`), `_run_hydra` (which runs, sweeps, or answers --help / --cfg /
  --info), and for `--experimental-rerun` `hydra.main._get_rerun_conf` and `hydra.core.utils._flush_loggers`.
  hydra.main offers no way to pass the arguments but `sys.argv`.
- `BasicSweeper` (hydra/_internal/core_plugins/basic_sweeper.py): the grid sweeper's base class; it uses its
  `max_batch_size`, `params`, `config`, `launcher`, `overrides`, `split_overrides_to_chunks`, `split_arguments`,
  `get_job_batch` and `is_done`. Looked up when asked for, not when this module is imported: Hydra's plugin scan
  (hydra/core/plugins.py `_scan_all_plugins`) executes every module of hydra._internal.core_plugins again, even
  one already imported, so a BasicSweeper taken before the scan is not the class its own `__init__` names in
  `super(BasicSweeper, self)` after it (TypeError: "super(type, obj): obj must be an instance or subtype of
  type" when Hydra instantiates the grid sweeper).
- `job_error`: `JobReturn._return_value`, the exception a failed job raised (the public `return_value` raises it
  only after writing a line of its own to stderr).
- `hydra_config`: assigns `HydraConfig.instance().cfg` to restore the config before (set_config, the public
  setter, refuses None, which is what it is before any is set).
- `show_full_tracebacks`: $HYDRA_FULL_ERROR, which Hydra reads from the environment only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from marker_lab.core import environment

VERSION_BASE = "1.3"  # hydra.main's version_base


def __getattr__(name: str) -> Any:
    """`BasicSweeper`, from the module Hydra's plugin scan left (see the module's docstring)."""
    if name == "BasicSweeper":
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        return BasicSweeper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_app(task_function: Callable[[Any], Any], config_dir: str, config_name: str, args: list[str],
            prog: str) -> None:
    """What `hydra.main(config_path=config_dir, config_name=config_name, version_base=VERSION_BASE)(task_function)()`
    does, on the argument list `args` instead of `sys.argv` (which hydra.main parses, and this leaves as it is).
    `prog` names the command in the usage line of Hydra's argument errors (hydra.main takes it from sys.argv[0])."""
    from hydra import version
    from hydra._internal.utils import _run_hydra, get_args_parser
    from hydra.core.utils import _flush_loggers
    from hydra.main import _get_rerun_conf

    version.setbase(VERSION_BASE)
    parser = get_args_parser()
    parser.prog = prog
    parsed = parser.parse_args(args)
    if parsed.experimental_rerun is not None:
        task_function(_get_rerun_conf(parsed.experimental_rerun, parsed.overrides))
        _flush_loggers()
        return
    _run_hydra(args=parsed, args_parser=parser, task_function=task_function, config_path=config_dir,
               config_name=config_name)


def job_error(ret) -> BaseException:
    """The exception a failed Hydra job (a JobReturn whose status is FAILED) raised or was given."""
    return ret._return_value


@contextmanager
def hydra_config(cfg) -> Iterator[None]:
    """Hydra's global config (what `${hydra:...}` resolves against) set to `cfg` inside the block, as in that
    cell's job; the one before is back on leaving it, however it is left."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    saved = instance.cfg
    instance.set_config(cfg)
    try:
        yield
    finally:
        instance.cfg = saved


def show_full_tracebacks() -> None:
    """`--verbose`: full tracebacks, as HYDRA_FULL_ERROR=1 gives. Hydra decides from the environment only
    (hydra/_internal/utils.py run_and_report reads os.environ["HYDRA_FULL_ERROR"]; there is no flag or API), and
    the processes a sweep starts (its cells, the shared eval) inherit the environment and read it there too: so
    this is an environment write, for this process and every process it starts."""
    environment.set_full_error()
