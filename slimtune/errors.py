"""User-facing errors: the CLI prints one line and exits with code 2, no traceback."""


class SlimtuneError(Exception):
    """Bad input the user can fix (the message names the key or file and the fix)."""


class ConfigError(SlimtuneError, ValueError):
    """An unknown key, a wrong type or an impossible value in a recipe or override."""
