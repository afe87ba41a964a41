"""Error types raised for bad user input (configs, CLI flags, paths, cluster layout)."""


class ConfigError(ValueError):
    """A user-supplied setting is invalid; the message names the field, the value and what would work."""


class TrainingHaltedError(RuntimeError):
    """Training cannot go on (for example, too many consecutive non-finite steps); the message says why."""
