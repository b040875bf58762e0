"""The run directory every stage reads and writes: its layout, lifecycle, manifest, metrics and adapter (rundir).
May import kit.core, kit.models and kit.config."""
