"""The one exception type of the library: every error about the user's input or files is an `ASRError`.

Its subclasses say which kind of input is at fault (audio, manifest, corpus, configuration, model
folder, language model, options, device); each message names the file (and line) and the problem.
The CLI prints it on one line and exits with status 2, without a traceback.
"""


class ASRError(Exception):
    """Input, files or settings that asr cannot use; the message says which and why."""


class OptionsError(ASRError, ValueError):
    """A call's options (decoding, transcription) that are out of range or of the wrong kind."""


class DeviceError(ASRError, RuntimeError):
    """A device that was asked for but is not there (e.g. cuda on a machine without a GPU)."""
