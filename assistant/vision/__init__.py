"""Cameras, image preprocessing and vision encoders."""
