"""User errors: problems the person running megadrp fixes (a config key, a file, a launch
variable), as opposed to bugs. Every command turns a `UserError` into one line on stderr,
naming the key, file or variable and what to do, and exit code 2 — never a traceback.

They stay `ValueError`s, as each module raised before the hierarchy existed, so callers that
catch `ValueError` keep working. Each class lives here, and the module that raises it imports
it from here (`from megadrp.errors import ConfigError`).
"""
from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A problem in what the user gave: one line, exit 2."""

    exit_code = EXIT_USER_ERROR


class ConfigError(UserError):
    """A config that cannot run; the message names the key and what to do."""


class LaunchError(ConfigError):
    """A launch environment megadrp cannot run in; one line naming the variable and what to do."""


class DataError(UserError):
    """Input data that cannot be used: names the file (and line or shard)."""


class ManifestError(DataError):
    """DATA_DIR/manifest.json missing, malformed, or not matching what a run asks for."""


class IndexedDatasetError(DataError):
    """A Megatron .bin/.idx pair that is missing, torn or malformed."""


class CorpusError(DataError):
    """A corpus file that cannot be read as documents (format, encoding, JSON key)."""


class TokenizerError(DataError):
    """A tokenizer directory that cannot be loaded or does not fit the data."""


class PreprocessError(DataError):
    """Preprocessing refused its inputs or output directory."""


class ModelError(UserError):
    """A model directory or shape megadrp cannot use."""


class CheckpointError(ModelError):
    """A Hugging Face checkpoint with missing or mis-shaped weights."""


class FamilyError(ModelError):
    """A model config megadrp cannot reproduce exactly; names the config.json key."""


class TargetShapeError(ModelError):
    """A prune target that cannot be reached from the source model."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row, non-finite weights); the last
    good checkpoint is kept and named. Not a user error of the config: exit 2 all the same."""
