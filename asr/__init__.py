"""asr: a Deep Speech 2-style speech recognizer (log-mel -> conv -> bidirectional GRU -> CTC)."""

from .audio import AudioError, load_audio
from .decoding import Transcription, Word
from .errors import ASRError
from .text import Vocabulary, normalize_text
from .transcribe import ASRModel, TranscribeOptions, load_model

__version__ = "0.1.0"

__all__ = ["ASRError", "ASRModel", "AudioError", "TranscribeOptions", "Transcription", "Vocabulary", "Word",
           "load_audio", "load_model", "normalize_text", "__version__"]
