"""Error types shared by modules that must not import each other (the engine and the checkpoints)."""


class ConfigError(ValueError):
    """A ds_config value is missing, malformed or unsupported, or a checkpoint cannot serve this run;
    the message names it. Recipes turn it into one line on stderr and exit code 2."""
