"""Dynamic int8 quantization, load_model's CPU default: where it applies, what it changes, and its errors."""

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

import asr
from asr.checkpoint import save_model
from asr.cli import main as cli_main
from asr.errors import OptionsError
from asr.serve.streaming import PosteriorStream
from asr.serve.transcribe import _network_precision, quantize_int8

from .conftest import TEXTS, tone_speech
from .test_streaming import MODELS, noise, offline, random_model, streamed
from .test_streaming_model import one_way


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    monkeypatch.delenv("ASR_PRECISION", raising=False)
    monkeypatch.delenv("ASR_BACKEND", raising=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A small random one-way model folder, as training writes it (no model.onnx)."""
    folder = tmp_path_factory.mktemp("precision") / "model"
    save_model(folder, one_way([[5, 11]], [[2, 2]], 1), asr.Vocabulary())
    return folder


def is_int8(model: asr.ASRModel) -> bool:
    """Every GRU and linear layer dynamically quantized (and none left in fp32)."""
    layers = [rnn.gru for rnn in model.model.rnns] + [model.model.head[1]]
    quantized = [isinstance(m, (nnqd.GRU, nnqd.Linear)) for m in layers]
    assert all(quantized) or not any(quantized)
    return all(quantized)


def test_int8_is_the_cpu_default_and_fp32_is_kept_on_request(tiny_folder):
    default = asr.load_model(tiny_folder, device="cpu")
    assert (default.precision, default.backend) == ("int8", "torch") and is_int8(default)
    fp32 = asr.load_model(tiny_folder, device="cpu", precision="fp32")
    assert fp32.precision == "fp32" and not is_int8(fp32) and type(fp32.model.rnns[0].gru) is nn.GRU
    assert default.model.num_parameters() == fp32.model.num_parameters()  # quantized weights count too
    assert asr.load_model(tiny_folder, device="cpu", precision="int8").precision == "int8"
    assert asr.ASRModel(fp32.model, fp32.vocab).precision == "fp32"  # built directly, as training's scoring does
    wave = torch.from_numpy(tone_speech(TEXTS[0]))
    assert torch.equal(default.log_mel(wave), fp32.log_mel(wave))  # the features stay fp32


def test_the_environment_variable_is_the_default(tiny_folder, monkeypatch):
    monkeypatch.setenv("ASR_PRECISION", "fp32")
    assert asr.load_model(tiny_folder, device="cpu").precision == "fp32"
    assert asr.load_model(tiny_folder, device="cpu", precision="int8").precision == "int8"  # the argument wins
    monkeypatch.setenv("ASR_PRECISION", "int4")
    with pytest.raises(OptionsError, match=r"unknown precision 'int4' \(from \$ASR_PRECISION\); choose one of auto"):
        asr.load_model(tiny_folder, device="cpu")


def test_unknown_values_and_int8_off_the_torch_cpu_are_clear_errors(tiny_folder):
    with pytest.raises(OptionsError, match="unknown precision 'fp16'; choose one of auto, int8, fp32"):
        asr.load_model(tiny_folder, device="cpu", precision="fp16")
    with pytest.raises(OptionsError, match="precision int8 .* cannot run on cuda:0"):
        _network_precision("int8", torch.device("cuda:0"), None)
    assert _network_precision("auto", torch.device("cuda:0"), None) == "fp32"


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'asr[onnx]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (a dependency: pip install -e .)")
    from asr.serve.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("precision_onnx") / "model"
    save_model(folder, one_way([[5, 11]], [[2, 2]], 1), asr.Vocabulary())
    export_onnx(folder)
    return folder


def test_the_onnx_backend_runs_fp32_and_refuses_int8(onnx_folder, capsys, monkeypatch):
    model = asr.load_model(onnx_folder, device="cpu")  # auto: model.onnx runs the network
    assert (model.backend, model.precision) == ("onnx", "fp32") and not is_int8(model)
    with pytest.raises(OptionsError, match=r"precision int8 .* cannot run with the onnx backend"):
        asr.load_model(onnx_folder, device="cpu", backend="onnx", precision="int8")
    # asked for int8, "auto" runs torch (the shipped model has a model.onnx, and int8 stays available)
    int8 = asr.load_model(onnx_folder, device="cpu", precision="int8")
    assert (int8.backend, int8.precision) == ("torch", "int8") and is_int8(int8)
    monkeypatch.setenv("ASR_PRECISION", "int8")
    assert asr.load_model(onnx_folder, device="cpu").backend == "torch"
    monkeypatch.delenv("ASR_PRECISION")
    # the CLI passes --backend and --precision on: the same error, on one line, status 2
    for command in (["transcribe", "x.wav"], ["evaluate", "--manifest", "x.jsonl"]):
        with pytest.raises(SystemExit) as exit_:
            cli_main(command + ["--model", str(onnx_folder), "--device", "cpu", "--backend", "onnx",
                                "--precision", "int8"])
        assert exit_.value.code == 2
        assert "error: precision int8 quantizes the torch network" in capsys.readouterr().err


def test_int8_transcribes_as_fp32(trained_tiny_model):
    int8 = asr.load_model(trained_tiny_model, device="cpu")
    fp32 = asr.load_model(trained_tiny_model, device="cpu", precision="fp32")
    assert (int8.precision, fp32.precision) == ("int8", "fp32")
    audio = [tone_speech(t, seed=i) for i, t in enumerate(TEXTS)]
    options = dict(sample_rate=16_000, batch_size=3)  # padded batches
    got, expected = int8.transcribe(audio, **options), fp32.transcribe(audio, **options)
    assert [r.text for r in got] == [r.text for r in expected] == TEXTS
    assert [(w.start, w.end) for r in got for w in r.words] == [(w.start, w.end) for r in expected for w in r.words]


# Dynamic quantization scales each activation tensor by its own range, call by call: a stream's chunks are
# scaled apart from the whole utterance, so int8 streamed posteriors equal the offline int8 ones only up to
# quantization noise. On these random models that noise is 0.03-0.08 nats (int8 against fp32, offline) and
# streaming adds 0.04-0.11; a GRU state lost between two chunks costs 0.6-1.3. Hence the tolerance.
STREAM_TOLERANCE = 0.25


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("chunk_ms", [10, 1000])
def test_int8_streams_as_offline_up_to_quantization_noise(case, chunk_ms):
    model = quantize_int8(random_model(case))
    wave = noise(36_123)
    expected = offline(model, wave)
    got = streamed(PosteriorStream(model), wave, [16 * chunk_ms])
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < STREAM_TOLERANCE
    assert (expected - offline(random_model(case), wave)).abs().max() > 1e-3  # int8 indeed


def test_the_stream_tolerance_sees_a_lost_gru_state():
    model = quantize_int8(random_model(MODELS[0]))
    wave = noise(16_000, seed=2)
    stream = PosteriorStream(model)
    forgetful = [stream.feed(wave[:8000])]
    stream.hidden = [None] * len(stream.hidden)
    forgetful += [stream.feed(wave[8000:]), stream.finish()]
    assert (torch.cat(forgetful) - offline(model, wave)).abs().max() > STREAM_TOLERANCE
