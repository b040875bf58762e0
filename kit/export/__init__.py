"""Exports of a trained run: the adapter merged into 16-bit weights (exporter) and GGUF files with an Ollama
Modelfile (gguf). May import the packages below it: kit.core .. kit.train."""
