"""Serving a trained model: transcription, scoring, ONNX runtime, the shipped model and the web demo."""
