import os
import shutil

import pytest

from tests.helpers import ASSETS, make_default, run_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run through the device tool (see docs/benchmarks.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from kit.models.template import load_tokenizer
    return load_tokenizer("bundled")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's demo, exactly as configured, trained once per session into a temporary runs/."""
    cwd = tmp_path_factory.mktemp("demo")
    res = run_recipe(["--config", "demo", f"run.output_dir={cwd / 'runs'}"], cwd=cwd)
    return cwd / "runs" / "demo", res


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
    """The shipped smollm2 recipe as make demo trains it (its DEMO_TRAIN: one epoch; a real model,
    SmolLM2-135M-Instruct, ChatML), once per session on CPU into a temporary runs/."""
    cwd = tmp_path_factory.mktemp("smollm2")
    res = run_recipe(["--config", "smollm2", *make_default("DEMO_TRAIN"), f"run.output_dir={cwd / 'runs'}"], cwd=cwd,
                     timeout=2400)
    return cwd / "runs" / "smollm2", res


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random-weight model of kit.models.tiny's 'tiny' shape (the demo's base), built once per session."""
    from kit.models.tiny import build_random_model
    return build_random_model("tiny", 0, tmp_path_factory.mktemp("tiny") / "base-model")


@pytest.fixture
def adapter_run(tmp_path, tiny_base, tokenizer):
    """A run directory for tests that need an adapter but not a trained one: the KB-sized LoRA adapter of
    tests/assets/adapter (PEFT, r=4 on the 7 projections of the 'tiny' shape, as initialised), pointed at
    the session's tiny base, with the tokenizer and the demo recipe's config.yaml."""
    from kit.config.load import load_config, to_yaml
    from tests.helpers import edit_adapter_config
    run = tmp_path / "run"
    shutil.copytree(ASSETS / "adapter", run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(to_yaml(load_config("demo")))
    return edit_adapter_config(run, base_model_name_or_path=str(tiny_base))
