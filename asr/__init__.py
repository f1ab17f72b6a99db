"""asr: a Deep Speech 2-style speech recognizer (log-mel -> conv -> GRUs -> CTC), offline or streaming."""

from .audio import AudioError, load_audio
from .decoding import DecodingOptions, Transcription, Word
from .errors import ASRError
from .serve.streaming import Streamer, StreamEvent
from .serve.transcribe import ASRModel, TranscribeOptions, load_model
from .text import Vocabulary, normalize_text

__version__ = "0.1.0"

__all__ = ["ASRError", "ASRModel", "AudioError", "DecodingOptions", "StreamEvent", "Streamer", "TranscribeOptions",
           "Transcription", "Vocabulary", "Word", "load_audio", "load_model", "normalize_text", "__version__"]
