"""The errors a user acts on. Each message is one line that names the offending key, file, line or endpoint."""


class MarkerLabError(Exception):
    """A problem with what the user asked for or gave us (not a bug): printed as one line, no traceback."""


class ConfigError(MarkerLabError, ValueError):
    """A config or input file that cannot run, found before any model loads; the message names the key and value
    (and the file and line for a bad input file)."""
