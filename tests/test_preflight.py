"""kit serve's preflight on the small adapter fixture (tests/assets): what vLLM would refuse is refused
before any server starts; no training needed."""
import json
from pathlib import Path

import pytest
import yaml

from kit.core.errors import AdapterError, PreflightError
from kit.serve import launcher, preflight
from tests.helpers import edit_adapter_config


@pytest.mark.parametrize("changes, expected", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "trains biases"),
    ({"modules_to_save": ["lm_head"]}, "fully trained modules"),
    ({"target_modules": ["q_proj", "lm_head"]}, "does not support"),
    ({"r": 600}, "exceeds vLLM's largest"),
])
def test_preflight_refuses_unservable_adapters(adapter_run, changes, expected):
    with pytest.raises(PreflightError, match=expected) as e:
        preflight.check([edit_adapter_config(adapter_run, **changes)])
    if expected != "exceeds vLLM's largest":
        assert "--merged" in str(e.value)


def test_preflight_picks_smallest_allowed_rank(adapter_run):
    assert preflight.check([edit_adapter_config(adapter_run, r=12)]).max_lora_rank == 16
    assert preflight.check([edit_adapter_config(adapter_run, r=300)]).max_lora_rank == 320


def test_preflight_refuses_adapter_for_another_base_shape(adapter_run, tmp_path):
    from kit.models.tiny import llama31_config
    other = tmp_path / "other-base"
    other.mkdir()
    cfg = llama31_config("tiny").to_dict()
    cfg["hidden_size"] = 512
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="trained for a different model"):
        preflight.check([adapter_run], base=str(other))


def test_bnb_4bit_base_is_served_on_16bit_base(adapter_run, tiny_base):
    alias = Path(str(tiny_base) + "-bnb-4bit")
    alias.symlink_to(tiny_base)
    try:
        p = preflight.check([edit_adapter_config(adapter_run, base_model_name_or_path=str(alias))])
    finally:
        alias.unlink()
    assert p.base == str(tiny_base) and any("16-bit base" in n for n in p.notes)


def test_preflight_max_model_len(adapter_run):
    assert preflight.check([adapter_run]).max_model_len == 256  # the run's max_seq_length
    assert any("below the runs' max_seq_length" in n for n in preflight.check([adapter_run], max_model_len=128).notes)
    with pytest.raises(PreflightError, match="max_position_embeddings"):
        preflight.check([adapter_run], max_model_len=10**6)



def test_a_run_trained_past_the_bases_positions_is_served_at_them(adapter_run):
    run = adapter_run  # a copy of its own
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["max_seq_length"] = 262144  # the tiny base: Llama 3.1's 131,072 positions, its llama3 RoPE
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    p = preflight.check([run])
    assert p.max_model_len == 131072 and any("past the base's 131,072 positions" in n for n in p.notes)


def test_non_loopback_needs_api_key_which_never_reaches_argv(adapter_run, monkeypatch):
    p = preflight.check([adapter_run])
    monkeypatch.delenv("KIT_API_KEY", raising=False)
    with pytest.raises(PreflightError, match="API key"):
        launcher.command(p, "0.0.0.0", 8000, "KIT_API_KEY")
    monkeypatch.setenv("KIT_API_KEY", "s3cret-token")
    cmd, env = launcher.command(p, "0.0.0.0", 8000, "KIT_API_KEY")
    assert "s3cret-token" not in " ".join(cmd) and env["VLLM_API_KEY"] == "s3cret-token"
    assert "--trust-remote-code" not in cmd
    default_cmd, _ = launcher.command(p, "127.0.0.1", 8000, "KIT_API_KEY")
    assert default_cmd[default_cmd.index("--host") + 1] == "127.0.0.1"


def test_missing_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterError, match="no adapter"):
        preflight.check([tmp_path])


def test_merged_without_export_is_refused(tmp_path):
    with pytest.raises(PreflightError, match="no merged export"):
        preflight.check([tmp_path], merged=True)


def test_every_reader_accepts_a_bare_adapter_folder_and_maps_a_4bit_base(adapter_run, tiny_base):
    from kit.eval.infer import load_adapter_model
    from kit.run.rundir import read_adapter
    folder = adapter_run / "adapter"
    edit_adapter_config(adapter_run, base_model_name_or_path=f"{tiny_base}-unsloth-bnb-4bit")
    assert read_adapter(folder) == read_adapter(adapter_run) and read_adapter(folder).base == str(tiny_base)
    assert preflight.check([folder]).base == str(tiny_base)
    model, _ = load_adapter_model(folder)
    assert model.peft_config["default"].r == 4
