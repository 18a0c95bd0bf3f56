"""The one error a user sees for a bad setting: a one-line message naming the value (exit 2 in the CLI)."""


class ConfigError(ValueError):
    """A bad or unsupported setting; the message is one line that names the value and what is allowed."""
