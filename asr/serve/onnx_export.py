"""Export a trained model's network to ONNX (`model.onnx` in the model folder) and run it with onnxruntime.

The graph starts after the features: normalised log-mel (batch, mels, frames) and frame counts in,
CTC log-probabilities (batch, frames', vocab; of a model with word pieces, characters + pieces) and output frame
counts out; batch and time are dynamic.
Features stay in torch: torchaudio's STFT does not export with the TorchScript exporter, the
torch.export-based exporter fails on the GRUs, and onnxruntime's STFT was no faster (bench/README.md).

Run on a padded batch without packing, a bidirectional GRU's backward direction would start in the
padding and carry it into every shorter item's valid frames. So each bidirectional GRU is exported
as two one-way GRUs with its weights; the backward one reads each item's frames reversed within the
item's own length, so in both directions padding comes after the valid frames and never reaches
them: every item of a padded batch gets the log-probabilities torch gives it alone (or packed) on its
valid frames, and batches still run whole. (The TorchScript exporter can turn packed sequences into
ONNX GRU sequence lengths, as fast, but through an undocumented path it warns lacks shape inference.)
A unidirectional model's GRUs run as they are: their padding already comes after the valid frames, and
the lookahead convolution zeroes it before reading ahead.
Weights that fp16 holds exactly (a shipped model's: packaging.py) are stored as fp16 and cast back to
fp32 when onnxruntime loads the graph: half the file, the same numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoint import MODEL_WEIGHTS, CheckpointError, load_model_files
from ..files import replaced_atomically
from ..model import DeepSpeech2, GRULayer

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
BACKEND_ENV = "ASR_BACKEND"  # "auto" (default), "onnx" or "torch"
BACKENDS = ("auto", "onnx", "torch")
OPSET = 17
WEIGHTS_KEY = "asr.weights_sha256"  # metadata: which model.safetensors the graph was exported from
INPUTS, OUTPUTS = ["features", "frames"], ["log_probs", "out_frames"]
HALF_MIN_ELEMENTS = 1024  # smaller fp16-exact initializers stay fp32: a Cast node each is not worth their bytes
MISSING_ONNX = "ONNX export needs the onnx package: pip install 'asr[onnx]'"
MISSING_ONNXRUNTIME = "running model.onnx needs onnxruntime, one of asr's dependencies: pip install onnxruntime"


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def weights_digest(model_dir: str | os.PathLike) -> str:
    """SHA-256 of the folder's model.safetensors."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / MODEL_WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first lengths[b] frames of each item of x (batch, time, ...); padding stays in place."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class TwoWayGRU(nn.Module):
    """A bidirectional GRULayer as two one-way GRUs (same weights) that export without packed sequences."""

    def __init__(self, layer: GRULayer):
        super().__init__()
        gru = layer.gru
        self.norm = layer.norm
        self.forward_gru = nn.GRU(gru.input_size, gru.hidden_size, batch_first=True)
        self.backward_gru = nn.GRU(gru.input_size, gru.hidden_size, batch_first=True)
        with torch.no_grad():
            for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
                getattr(self.forward_gru, name).copy_(getattr(gru, name))
                getattr(self.backward_gru, name).copy_(getattr(gru, name + "_reverse"))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        forward, _ = self.forward_gru(x)
        backward, _ = self.backward_gru(reverse_within(x, lengths))
        return forward + reverse_within(backward, lengths)


class OneWayGRU(nn.Module):
    """A unidirectional GRULayer without packed sequences (its output on padding frames is not zeroed)."""

    def __init__(self, layer: GRULayer):
        super().__init__()
        self.norm, self.gru = layer.norm, layer.gru

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.gru(self.norm(x))[0]


class ExportableNetwork(nn.Module):
    """DeepSpeech2 after its features: (features (batch, mels, frames), frames) -> (log-probs, frames')."""

    def __init__(self, model: DeepSpeech2):
        super().__init__()
        self.conv = model.conv
        self.rnns = nn.ModuleList((TwoWayGRU if layer.gru.bidirectional else OneWayGRU)(layer) for layer in model.rnns)
        self.lookahead = model.lookahead
        self.head, self.piece_head = model.head, model.piece_head
        self.output_log_probs = model.output_log_probs  # both output layers', side by side
        self.eval()

    def forward(self, feats: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self.conv(feats.transpose(1, 2), frames)
        for rnn in self.rnns:
            x = rnn(x, lengths)
        return self.output_log_probs(self.lookahead(x, lengths)), lengths


def noise_batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded batch of noise waveforms of the given sample counts, and the counts."""
    gen = torch.Generator().manual_seed(seed)
    sample_lengths = torch.tensor(lengths)
    waves = 0.1 * torch.randn(len(lengths), max(lengths), generator=gen)
    return waves * (torch.arange(waves.shape[1])[None, :] < sample_lengths[:, None]), sample_lengths


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                tolerance: float = 1e-3) -> Path:
    """Export the folder's network to ONNX (default: MODEL_DIR/model.onnx), written atomically.

    The new file must match torch on a padded batch before it replaces any old one.
    """
    try:
        import onnx
    except ImportError:
        raise ImportError(MISSING_ONNX) from None
    model_dir = Path(model_dir)
    model, _, _ = load_model_files(model_dir, "cpu")
    out = Path(out) if out is not None else model_dir / ONNX_FILE
    hop = model.config.features.hop_length
    with torch.no_grad():
        example = model.input_features(*noise_batch([60 * hop, 37 * hop + 37], seed=0))
    with replaced_atomically(out) as (tmp,):
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and GRU batch-size notes
            warnings.simplefilter("ignore")
            torch.onnx.export(ExportableNetwork(model), example, str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=INPUTS, output_names=OUTPUTS,
                              dynamic_axes={"features": {0: "batch", 2: "time"}, "frames": {0: "batch"},
                                            "log_probs": {0: "batch", 1: "out_time"}, "out_frames": {0: "batch"}})
        graph = onnx.load(str(tmp))
        store_exact_halves(graph)
        onnx.helper.set_model_props(graph, {WEIGHTS_KEY: weights_digest(model_dir)})
        onnx.save(graph, str(tmp))
        check = noise_batch([5 * hop + 11, 83 * hop, 41 * hop + 101], seed=1)  # another batch size and lengths
        difference = max_difference(model, OnnxNetwork(tmp), *check)
        if not difference <= tolerance:
            raise RuntimeError(f"{out}: exported graph differs from torch by {difference:.2e} (> {tolerance})")
    return out


def store_exact_halves(model: onnx.ModelProto) -> int:
    """Store each float32 initializer of at least HALF_MIN_ELEMENTS values that fp16 holds exactly as fp16,
    behind a Cast to float32 under its old name (onnxruntime folds the Cast when it loads the graph), in place.
    Returns how many were stored so. Weights trained in fp32 are rarely exact in fp16 and stay as they are."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    casts = []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if values.size < HALF_MIN_ELEMENTS or not np.array_equal(half.astype(np.float32), values):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [init.name], [name], to=TensorProto.FLOAT, name=f"{name}.to_fp32"))
    for i, node in enumerate(casts):  # first: the graph stays in topological order
        model.graph.node.insert(i, node)
    return len(casts)


def max_difference(model: DeepSpeech2, onnx_network: OnnxNetwork, waves: torch.Tensor, lengths: torch.Tensor
                   ) -> float:
    """Largest |torch - onnxruntime| log-probability over the valid frames of a padded batch of waveforms."""
    with torch.no_grad():
        expected, frames = model(waves, lengths)
        got, got_frames = onnx_network(*model.input_features(waves, lengths))
    if not torch.equal(frames, got_frames):
        return float("inf")
    return max((expected[b, :n] - got[b, :n]).abs().max().item() for b, n in enumerate(frames.tolist()))


class OnnxNetwork:
    """An exported network run by onnxruntime on the CPU, called like ExportableNetwork."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spinning: bool = False):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(MISSING_ONNXRUNTIME) from None
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        # onnxruntime's threads spin for a while after each run by default; torch's threads (the features, the
        # speech check) then compete with them for the cores: one utterance at a time, the network ran slower
        # than torch's (bench/README.md, "CPU inference"). `spinning` keeps onnxruntime's default.
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / NoSuchFile types
            raise CheckpointError(f"{self.path}: not a usable ONNX model ({e}); run `asr export` again") from None
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        if names != (INPUTS, OUTPUTS):
            raise CheckpointError(f"{self.path}: not exported by asr (inputs/outputs {names})")
        self.weights_sha256 = self.session.get_modelmeta().custom_metadata_map.get(WEIGHTS_KEY)

    def __call__(self, feats: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, out_frames = self.session.run(
            OUTPUTS, {"features": feats.detach().float().cpu().numpy(), "frames": frames.cpu().long().numpy()})
        return torch.from_numpy(log_probs), torch.from_numpy(out_frames)


def resolve_backend(backend: str | None) -> str:
    """The backend asked for: `backend`, else $ASR_BACKEND, else "auto"; checked against BACKENDS."""
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def load_onnx_network(model_dir: str | os.PathLike, backend: str | None = None,
                      device: torch.device | str = "cpu") -> OnnxNetwork | None:
    """The folder's model.onnx for onnxruntime, or None where torch should run the network.

    backend "torch": None. "onnx": the graph, or an error saying why not. "auto" (default, or
    $ASR_BACKEND): the graph when the device is the CPU, model.onnx exists, onnxruntime is installed
    and the graph was exported from the folder's current weights; else None. A model.onnx that
    cannot be read is an error in both "onnx" and "auto".
    """
    backend = resolve_backend(backend)
    path = Path(model_dir) / ONNX_FILE
    if backend == "torch":
        return None
    if backend == "auto" and (torch.device(device).type != "cpu" or not path.is_file()
                              or not onnxruntime_available()):
        return None
    if torch.device(device).type != "cpu":
        raise ValueError(f"the onnx backend runs on the CPU, not on {device}")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; write it with `asr export {model_dir}`")
    network = OnnxNetwork(path)
    if network.weights_sha256 != weights_digest(model_dir):
        message = f"{path}: exported from other weights than {Path(model_dir) / MODEL_WEIGHTS}; run `asr export` again"
        if backend == "onnx":
            raise CheckpointError(message)
        log.warning("%s; using torch", message)
        return None
    return network
