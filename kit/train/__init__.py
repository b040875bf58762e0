"""Training: the backend (Unsloth or transformers, imported first here), the model with LoRA, the memory estimate
and step plan, the trainers of each method (trainer), callbacks, trackers, several processes (distributed) and the
run's report. torch, transformers, TRL and PEFT come in with model, trainer and callbacks, after the backend is
active. May import kit.core, kit.models, kit.config, kit.run and kit.data."""
