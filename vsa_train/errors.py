"""The failures a launch expects: the user fixes them from their message alone, so train.py prints the message as
one line on stderr and exits with 2, without a traceback (HYDRA_FULL_ERROR=1 shows it). Anything else is a bug or
a failure of the machine and keeps its traceback.

    LaunchError                     the base: a launch that cannot go on for the reason its message names
      ConfigError (fields.py)       bad values, one line each
      RunDirError (rundir.py)       a run directory that refuses the launch: another config or global batch, a
                                    live writer holding its lock, no usable checkpoint
      LauncherError (launcher.py)   a launcher setting the trainer does not honour (accelerate launch --use_fsdp,
                                    --dynamo_backend, ...) or that contradicts the config (the precision)
      MissingInput                  an input the config names is missing or holds nothing usable (data.manifest,
                                    data.folder, data.path, a Hub dataset id that does not resolve)

This module imports nothing: every layer raises them.
"""


class LaunchError(Exception):
    """A launch that cannot go on for the reason its message names (the base of the expected failures)."""


class MissingInput(LaunchError, FileNotFoundError):
    """An input the config names is missing, or none of what it holds is usable."""


class RunDirError(LaunchError, RuntimeError):
    """A launch that the run directory refuses (mismatching config, a live writer, no usable checkpoint)."""
