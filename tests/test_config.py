import re
from pathlib import Path

import pytest

from kit.config import ConfigError, all_keys, check_device, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_files_load_with_guide_values():
    cfg = load_config(ROOT / "recipes/llama31_sft.yaml")
    t = cfg.train
    assert cfg.model.name == "meta-llama/Llama-3.1-8B-Instruct" and cfg.model.load_in_4bit
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (8, 4, 3)
    assert t.learning_rate == 1e-4 and t.warmup_ratio == 0.1 and t.optim == "adamw_torch"
    assert cfg.data.path == "beomi/KoAlpaca-v1.1a"
    demo = load_config(ROOT / "recipes/demo.yaml")
    assert demo.model.name == "random:tiny" and demo.data.path == "kit:ko_sample"


def test_dotted_overrides_change_fields_and_parse_numbers():
    cfg = load_config(ROOT / "recipes/llama31_sft.yaml",
                      ["train.learning_rate=2e-4", "lora.r=32", "data.path=./my.jsonl", "lora.target_modules=qkv",
                       "data.fields={instruction: question, output: answer}"])
    assert cfg.train.learning_rate == 2e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.lora.r == 32 and cfg.data.path == "./my.jsonl"
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.data.fields == {"instruction": "question", "output": "answer"}


@pytest.mark.parametrize("override, expected", [
    ("train.learning_rat=1e-4", "Did you mean 'train.learning_rate'"),
    ("train.per_device_batch_size=4", "'train.per_device_train_batch_size'"),
    ("lora.rank=8", "unknown key 'lora.rank'"),
    ("trian.seed=1", "unknown key 'trian'"),
])
def test_unknown_keys_name_the_closest(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_closest(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  num_train_epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(f) in str(e.value) and "train.num_train_epochs" in str(e.value)


@pytest.mark.parametrize("override, expected", [
    ("train.per_device_train_batch_size=abc", "expected a whole number"),
    ("train.per_device_train_batch_size=0", "must be >= 1"),
    ("train.learning_rate=5", "0 < lr <= 1e-2"),
    ("model.load_in_4bit=maybe", "expected true or false"),
    ("train.optim=adamw", "'adamw_torch'"),
    ("train.lr_scheduler_type=cosin", "Did you mean 'cosine'"),
    ("lora.dropout=1.5", "0 <= dropout < 1"),
    ("model.precision=fp8", "not one of auto, bf16, fp16, fp32"),
    ("model.max_seq_length=4", "16..131072"),
    ("lora.target_modules=[q_proj, embed_tokens]", "not Llama linear projections"),
])
def test_wrong_types_and_ranges(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, expected", [
    (["train.warmup_ratio=0.1", "train.warmup_steps=10"], "both set"),
    (["data.eval_ratio=0", "train.eval_strategy=steps"], "there is no eval data"),
    (["lora.use_dora=true"], "vLLM does not serve DoRA"),
    (["lora.bias=all"], "without bias"),
    (["lora.modules_to_save=[lm_head]"], "fully trained modules"),
    (["train.early_stopping_patience=2", "train.save_strategy=epoch", "train.eval_strategy=steps"],
     "must equal eval_strategy"),
    (["model.name=random:huge"], "unknown random shape"),
    (["export.formats=[onnx]"], "use merged16 and/or gguf"),
    (["export.gguf_quant=q3"], "use one of f16, bf16, q8_0"),
    (["train.packing=true", "model.backend=hf"], "would let packed examples attend to each other"),
])
def test_impossible_combinations(overrides, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(None, overrides)


def test_unservable_lora_allowed_on_explicit_opt_in():
    cfg = load_config(None, ["lora.use_dora=true", "lora.allow_unservable=true"])
    assert cfg.lora.use_dora


def test_cuda_only_settings_refused_on_cpu():
    for override, expected in [("train.optim=paged_adamw_8bit", "needs bitsandbytes on a CUDA GPU"),
                               ("train.optim=adamw_8bit", "needs bitsandbytes on a CUDA GPU"),
                               ("train.packing=true", "packing=true needs a CUDA GPU")]:
        cfg = load_config(None, [override, "model.load_in_4bit=false"])
        with pytest.raises(ConfigError, match=expected):
            check_device(cfg, cuda=False, bf16_ok=False)
    with pytest.raises(ConfigError, match="QLoRA"):
        check_device(load_config(None), cuda=False, bf16_ok=False)
    check_device(load_config(None, ["train.optim=paged_adamw_8bit"]), cuda=True, bf16_ok=True)


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_config_field_is_read_by_the_code():
    source = "\n".join(p.read_text() for p in (ROOT / "kit").rglob("*.py") if p.name != "config.py")
    source += (ROOT / "kit/config.py").read_text().split("def validate")[1]
    unread = [k for k in all_keys() if not re.search(rf"\.{k.split('.')[-1]}\b", source)]
    assert not unread, f"config fields no code reads: {unread}"


def test_yaml_bare_no_means_the_strategy_no(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  eval_strategy: no\n  save_strategy: no\n")
    cfg = load_config(f, ["train.eval_strategy=no"])
    assert cfg.train.eval_strategy == "no" and cfg.train.save_strategy == "no"
