"""The one typed configuration: a section per module (model, lora, train, data, run, export), each owning its
settings, constants and checks; the whole (schema) and the recipe files with command-line overrides (load). May
import kit.core and kit.models; no stage: the stages import the config."""
