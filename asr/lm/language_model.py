"""Word n-gram language models with KenLM: text -> ARPA -> KenLM binary, loaded for beam search.

An LM folder holds `lm.bin` (KenLM binary), `words.txt` (its vocabulary, one word a line),
`lexicon.txt` (each word spelled in characters, for lexicon-constrained beam search) and `lm.json`.
The KenLM tools that build it come from kenlm_tools.py.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence, TextIO

from ..files import write_dir_atomically
from ..manifest import read_utf8
from ..text import Vocabulary, normalize_text
from .kenlm_tools import LMError, kenlm_tools

if TYPE_CHECKING:
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

GZIP_MAGIC = b"\x1f\x8b"
SNIFF_BYTES = 1 << 16  # a text file's first bytes that are checked for binary content
MAX_UNDECODABLE = 0.3  # share of characters that are not UTF-8 beyond which a file is binary


def _binary_content(head: bytes) -> str | None:
    """Why these first bytes of a file are not text (NUL bytes, or mostly not UTF-8), or None."""
    if b"\0" in head:
        return "it has NUL bytes"
    text = head.decode("utf-8", errors="replace")
    if text and text.count("\ufffd") > MAX_UNDECODABLE * len(text):
        return "most of its bytes are not UTF-8"
    return None


def open_text(path: Path) -> TextIO:
    """A text file for reading lines, gzipped or plain whatever its name says; stray bad bytes become U+FFFD.

    Raises LMError for a binary file (checked on its first bytes, after decompression).
    """
    gzipped = False
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == GZIP_MAGIC
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            why = _binary_content(f.read(SNIFF_BYTES))
    except (OSError, EOFError, zlib.error) as e:
        raise LMError(f"{path}: {'damaged gzip file' if gzipped else 'cannot read it'} ({e})") from None
    if why:
        raise LMError(f"{path}: not a text file ({why}); give plain or gzipped UTF-8 text, or JSONL manifests")
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _manifest_text(path: Path, number: int, line: str) -> str:
    """The "text" of one JSONL manifest line ("" for a blank line)."""
    if not line.strip():
        return ""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise LMError(f"{path}:{number}: not JSON ({e})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("text", ""), str):
        raise LMError(f'{path}:{number}: not a JSON object with a "text" string')
    return entry.get("text", "")


def normalized_sentences(paths: Iterable[str | os.PathLike], vocab: Vocabulary) -> Iterator[str]:
    """Every non-empty line of the files (.gz or plain; JSONL manifests give their "text"), normalised."""
    allowed = set(vocab.tokens[1:]) - {" "}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise LMError(f"{path}: text file not found")
        is_manifest = ".jsonl" in path.suffixes
        with open_text(path) as f:
            try:
                for number, line in enumerate(f, 1):
                    if is_manifest:
                        line = _manifest_text(path, number, line)
                    text = normalize_text(line)
                    text = " ".join(w for w in text.split() if set(w) <= allowed)
                    if text:
                        yield text
            except (OSError, EOFError, zlib.error) as e:
                raise LMError(f"{path}: damaged gzip file ({e})") from None


@dataclass
class LMInfo:
    order: int
    sentences: int
    words: int  # running words of training text
    vocabulary: int
    sources: list[str]
    weights: list[int] | None = None  # times each source was repeated (None: once each)
    binary_sha256: str = ""  # of lm.bin, checked when the folder is loaded ("": not recorded)
    quantize_bits: int | None = None  # bits per probability and backoff in lm.bin (None: full floats)


def build_lm(texts: Sequence[str | os.PathLike], out_dir: str | os.PathLike, order: int = 4,
             prune: Sequence[int] = (0, 0, 1), max_vocabulary: int | None = None, memory: str = "20%",
             vocab: Vocabulary | None = None, kenlm_source: str | os.PathLike | None = None,
             weights: Sequence[int] | None = None, quantize_bits: int | None = None) -> LMInfo:
    """Normalise `texts`, estimate a modified Kneser-Ney `order`-gram with lmplz, binarise it, write the folder.

    `prune` gives lmplz's count thresholds per order (e.g. 0 0 1: drop singleton trigrams and up);
    `max_vocabulary` keeps only the most frequent words (others become <unk>); `weights` repeats each
    text that many times, so that a small in-domain text counts for more beside a large general one;
    `quantize_bits` (2 to 24) stores each probability and backoff in that many bits, with compressed
    pointers (build_binary -q -a): a smaller lm.bin for a little accuracy.
    """
    vocab = vocab or Vocabulary()
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(texts) or any(not isinstance(w, int) or w < 1 for w in weights):
            raise LMError(f"weights must be one positive whole number per text ({len(texts)}), got {weights}")
    if quantize_bits is not None and (isinstance(quantize_bits, bool) or not isinstance(quantize_bits, int)
                                      or not 2 <= quantize_bits <= 24):
        raise LMError(f"quantize_bits must be a whole number from 2 to 24, got {quantize_bits!r}")
    lmplz, build_binary = kenlm_tools(kenlm_source)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="lm-") as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        counts: Counter[str] = Counter()
        sentences = 0
        with open(corpus, "w") as f:
            for text, weight in zip(texts, weights or [1] * len(texts)):
                text_counts: Counter[str] = Counter()
                for line in normalized_sentences([text], vocab):
                    f.write((line + "\n") * weight)
                    text_counts.update(line.split())
                    sentences += weight
                counts.update({w: n * weight for w, n in text_counts.items()})
        if sentences == 0:
            raise LMError(f"no usable text in {', '.join(map(str, texts))}")
        words = [w for w, _ in counts.most_common(max_vocabulary)]
        cmd = [str(lmplz), "-o", str(order), "--text", str(corpus), "--arpa", str(tmp / "lm.arpa"),
               "--discount_fallback", "-S", memory, "-T", str(tmp)]
        if any(prune):
            cmd += ["--prune", *map(str, list(prune)[: order])]
        if max_vocabulary:
            (tmp / "limit.txt").write_text("\n".join(words) + "\n")
            cmd += ["--limit_vocab_file", str(tmp / "limit.txt")]
        quantize = ["-q", str(quantize_bits), "-a", "255"] if quantize_bits else []
        for step in (cmd, [str(build_binary), *quantize, "trie", str(tmp / "lm.arpa"), str(tmp / "lm.bin")]):
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode != 0:
                raise LMError(f"{Path(step[0]).name} failed:\n{proc.stderr[-2000:]}")
        info = LMInfo(order, sentences, sum(counts.values()), len(words), [str(t) for t in texts], weights,
                      _sha256(tmp / "lm.bin"), quantize_bits)

        def fill(d: Path) -> None:
            shutil.move(str(tmp / "lm.bin"), d / "lm.bin")
            (d / "words.txt").write_text("\n".join(words) + "\n")
            (d / "lexicon.txt").write_text("".join(f"{w}\t{' '.join(w)}\n" for w in words))
            (d / "lm.json").write_text(json.dumps(asdict(info), indent=2))

        write_dir_atomically(out, fill)
    return info


@dataclass
class LanguageModel:
    """An LM folder, checked: the paths beam search needs."""
    folder: Path
    binary: Path
    lexicon: Path
    words: list[str]

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "LanguageModel":
        """The LM folder's files, checked: UTF-8 text files, a binary that KenLM opens and that has the checksum
        lm.json records (when it records one)."""
        folder = Path(folder)
        binary, lexicon, words = folder / "lm.bin", folder / "lexicon.txt", folder / "words.txt"
        for p in (binary, lexicon, words):
            if not p.is_file():
                raise LMError(f"{folder}: not a language model folder ({p.name} is missing); "
                              "build one with asr lm build")
        with open(binary, "rb") as f:
            magic = f.read(64)
        if not magic.startswith(b"mmap lm"):
            raise LMError(f"{binary}: not a KenLM binary file (damaged or of another kind)")
        lm = cls(folder, binary, lexicon, read_utf8(words, LMError).split())
        read_utf8(lexicon, LMError)
        lm.check_binary()
        recorded = _recorded_sha256(folder / "lm.json")
        if recorded and _sha256(binary) != recorded:  # damage KenLM cannot see (and may crash on)
            raise LMError(f"{binary}: damaged KenLM binary (its checksum is not the one in lm.json); "
                          "rebuild it with asr lm build")
        return lm

    def check_binary(self) -> None:
        """Raise LMError unless KenLM opens the binary (it checks its header, size and vocabulary; a few ms)."""
        self.kenlm(_word_dict(["<unk>"]))

    def kenlm(self, word_dict: "Dictionary") -> "KenLM":
        """Flashlight's KenLM over this binary; a damaged binary raises LMError instead of RuntimeError."""
        from flashlight.lib.text.decoder.kenlm import KenLM

        try:
            return KenLM(str(self.binary), word_dict)
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[-1][:200]
            raise LMError(f"{self.binary}: damaged KenLM binary (truncated, or not written by asr lm build): "
                          f"{reason}; rebuild it with asr lm build") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded_sha256(info: Path) -> str:
    """The lm.bin checksum that lm.json records ("" when there is none: LMs built before it was recorded)."""
    if not info.is_file():
        return ""
    try:
        recorded = json.loads(read_utf8(info, LMError)).get("binary_sha256", "")
    except (json.JSONDecodeError, AttributeError):
        raise LMError(f"{info}: not a JSON object (damaged?)") from None
    return recorded if isinstance(recorded, str) else ""


def _word_dict(words: Iterable[str]) -> "Dictionary":
    """A flashlight word dictionary of these words; unknown words map to the first."""
    from flashlight.lib.text.dictionary import Dictionary

    word_dict = Dictionary()
    for w in words:
        word_dict.add_entry(w)
    word_dict.set_default_index(0)
    return word_dict


@dataclass
class Perplexity:
    perplexity: float  # per word, the end of each sentence counted as a word
    words: int
    sentences: int
    oov_rate: float  # share of words outside the LM's vocabulary


def perplexity(lm: LanguageModel, texts: Sequence[str | os.PathLike]) -> Perplexity:
    """The LM's perplexity on text files or manifests (normalised as for build_lm), through flashlight's KenLM."""
    word_dict = _word_dict(["<unk>", *lm.words])
    model = lm.kenlm(word_dict)
    known = set(lm.words)
    log10_prob, words, sentences, oov = 0.0, 0, 0, 0
    for line in normalized_sentences(texts, Vocabulary()):
        tokens = line.split()
        state = model.start(False)
        for w in tokens:
            state, score = model.score(state, word_dict.get_index(w))
            log10_prob += score
            oov += w not in known
        _, score = model.finish(state)
        log10_prob += score
        words += len(tokens) + 1
        sentences += 1
    if sentences == 0:
        raise LMError(f"no usable text in {', '.join(map(str, texts))}")
    return Perplexity(10 ** (-log10_prob / words), words, sentences, oov / (words - sentences))
