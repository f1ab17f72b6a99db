"""The speech check's word filter (asr/speech_activity.py) and word times at the audio's end."""

import torch

from asr.audio import SAMPLE_RATE
from asr.decoding import Transcription, Word
from asr.speech_activity import SPEECH_HOP, keep_spoken_words


def test_a_late_spelled_word_is_kept_within_the_lookback():
    frames_per_second = SAMPLE_RATE // SPEECH_HOP
    speech = torch.zeros(frames_per_second, dtype=torch.bool)
    speech[: frames_per_second // 2] = True  # speech in the first half second, then silence
    result = Transcription("one two", [Word("one", 0.1, 0.3, 0.9), Word("two", 0.8, 0.9, 0.9)], 1.0)
    assert keep_spoken_words(result, speech).text == "one"  # "two" is 0.3 s after any speech
    assert keep_spoken_words(result, speech, lookback_seconds=0.3).text == "one two"


def test_word_times_end_by_the_audio_end():
    result = Transcription("one two", [Word("one", 0.1, 0.3, 0.9), Word("two", 0.95, 1.2, 0.9)], 1.0)
    result.end_words_by(1.0)
    assert [(w.start, w.end) for w in result.words] == [(0.1, 0.3), (0.95, 1.0)]
    result.end_words_by(0.2)
    assert [(w.start, w.end) for w in result.words] == [(0.1, 0.2), (0.2, 0.2)]
