"""Errors a user can fix by changing their input; the CLI turns them into exit code 2 and one `error:` line."""


class LoraflowInputError(Exception):
    """Bad usage, config or data: nothing was loaded, nothing is lost, fix the input and rerun."""


class ConfigError(LoraflowInputError):
    """The config (file, --set override or flow parameter) is invalid."""


class DatasetError(LoraflowInputError):
    """The dataset is unreadable or malformed; the message names the file, the row and the field."""


class QualityGateError(Exception):
    """The adapter falls short: smoke-infer's answers are unusable (empty, or never reached EOS), or its eval
    accuracy misses the hub.* gate (then nothing is pushed; the adapter stays saved)."""


class StoreConfigError(LoraflowInputError):
    """The artifact store is misconfigured: no such bucket, or credentials the endpoint rejects."""


class StoreUnavailableError(Exception):
    """The artifact store's endpoint cannot be reached (after retries)."""


class TrainingOutOfMemoryError(Exception):
    """The GPU ran out of memory: retrying the same batch would fail the same way, so it never retries."""


class StoreDataError(Exception):
    """Something in the store cannot be read as loraflow wrote it (a manifest or an alias file that is not valid
    JSON of the expected shape): store maintenance stops rather than guess what it references."""


class OutputWriteError(Exception):
    """output.dir could not be written at the end of a run (no space, no permission); the message is one line naming
    the folder and the reason. Not retried: the same write fails the same way until someone frees or fixes it."""
