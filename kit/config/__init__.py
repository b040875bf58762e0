"""The one typed configuration: a module per section (model, lora, train, data, run, export), each owning its
settings, constants and checks (what the checks share: issue); the whole, checked at once (schema); recipe files
and command-line overrides (load). May import kit.core and kit.models; no stage: the stages import the config."""
