"""The exception types that the CLI turns into a single clear line and a non-zero exit."""


class CGDError(Exception):
    """A user-facing error: bad input, missing files, unknown names. The message says what is
    wrong and how to fix it; the CLI prints it alone, without a traceback."""


class ConfigError(CGDError, ValueError):
    """A configuration value (YAML field, CLI option, Python parameter) is invalid."""


class Terminated(KeyboardInterrupt):
    """SIGTERM received by a command that stops cleanly on it (`grid run`): raised where Ctrl-C's
    KeyboardInterrupt would be, so both take the same clean-up path; the CLI exits with 143."""
