"""Audio in and out: sources, VAD, speech recognition, speech synthesis, sinks."""
