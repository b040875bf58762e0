"""The models the kit trains: Llama 3.1's facts (llama), the chat families and templates (families, template),
random-weight models (tiny), GGUF files as a base (gguf_source) and the Hugging Face Hub (hub). Light: no torch at
import time. May import kit.core."""
