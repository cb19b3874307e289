"""The errors a user acts on. Each message is one line that names the offending key, file, line or endpoint."""


class MarkerLabError(Exception):
    """A problem with what the user asked for or gave us (not a bug): printed as one line, no traceback."""


class ConfigError(MarkerLabError, ValueError):
    """A config or input file that cannot run, found before any model loads; the message names the key and value
    (and the file and line for a bad input file)."""


def config_error_line(exc: BaseException) -> str:
    """One line for a composition or validation failure, naming the key."""
    parts, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = " ".join(str(e).split())
        msg = msg.split(" full_key:")[0].split(" Set the environment variable HYDRA_FULL_ERROR")[0]
        msg = msg.split(" Config search path:")[0]
        if msg and msg not in parts and "$" not in msg and len(parts) < 2:
            parts.append(msg)
        key = getattr(e, "full_key", None)
        if key and not any(p.startswith("key: ") for p in parts):
            parts.append(f"key: {key}")
        e = e.__cause__ or e.__context__
    return "; ".join(parts)


class DiskFullError(MarkerLabError, OSError):
    """Not enough space where the cell writes: found before the model loads (an estimate), or a write that failed
    with ENOSPC anyway; the message names the directory and the space."""
