"""Synthetic speech for training: text-to-speech engines and the augmented corpus made with them."""
