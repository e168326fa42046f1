"""The one error type for bad user input: the CLI prints its message and exits with status 2."""


class AirloraError(ValueError):
    """Bad input from the user (config, flags, files, rank mappings); the message names the field."""
