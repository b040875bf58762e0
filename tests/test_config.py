import dataclasses
import re
import subprocess
import sys

import pytest

from kit.config.load import RECIPES, all_keys, load_config
from kit.config.schema import Config, check_device
from kit.config.train import TRAIN_KIT_ONLY, TrainConfig
from kit.core.errors import ConfigError
from tests.helpers import ROOT


def test_recipe_files_load_with_guide_values():
    cfg = load_config("llama31_sft")
    t = cfg.train
    assert cfg.model.name == "meta-llama/Llama-3.1-8B-Instruct" and cfg.model.load_in_4bit
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (8, 4, 3)
    assert t.learning_rate == 1e-4 and t.warmup_ratio == 0.1 and t.optim == "adamw_torch"
    assert cfg.data.path == "beomi/KoAlpaca-v1.1a"
    demo = load_config("demo")
    assert demo.model.name == "random:tiny" and demo.data.path == "kit:ko_sample"


def test_recipes_are_found_by_name_by_file_and_as_recipes_slash_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the shipped ones are found in the package
    by_name = load_config("demo")
    assert load_config("recipes/demo.yaml") == by_name == load_config(RECIPES / "demo.yaml")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "demo.yaml").write_text("run:\n  name: mine\n")
    assert load_config("recipes/demo.yaml").run.name == "mine"  # a file that exists is always the one read



def test_the_checkouts_recipes_folder_holds_the_shipped_recipes(monkeypatch):
    """recipes/ is where users copy from; the kit ships the same files as package data (kit/recipes/)."""
    checkout = {p.name: p.read_text() for p in (ROOT / "recipes").glob("*.yaml")}
    shipped = {p.name: p.read_text() for p in RECIPES.glob("*.yaml")}
    assert {"llama31_sft.yaml", "demo.yaml", "smollm2.yaml", "dpo.yaml", "dpo_demo.yaml"} <= set(shipped)
    differ = sorted(n for n in checkout.keys() | shipped.keys() if checkout.get(n) != shipped.get(n))
    assert not differ, f"recipes/ and kit/recipes/ differ in {differ}: edit recipes/NAME.yaml, copy it to kit/recipes/"
    monkeypatch.chdir(ROOT)
    for recipe in RECIPES.glob("*.yaml"):
        assert load_config(f"recipes/{recipe.name}") == load_config(recipe.stem)


@pytest.mark.parametrize("name", ["llama31_sft", "dpo"])
def test_a_recipe_file_of_the_checkout_plans_as_the_recipe_of_that_name(name):
    plans = [subprocess.run([sys.executable, "-m", f"kit.recipes.{name}", "--config", config, "--plan", "--examples",
                             "1000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
             for config in (f"recipes/{name}.yaml", name)]
    assert plans[0].returncode == 0 and "checkpoints" in plans[0].stdout, plans[0].stderr
    assert plans[0].stdout == plans[1].stdout

def test_dotted_overrides_change_fields_and_parse_numbers():
    cfg = load_config("llama31_sft",
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
    assert str(e.value).startswith(f"{f}, line 2: unknown key 'train.num_train_epoch'")


def test_every_problem_is_reported_at_once_with_its_file_line_or_override(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  name: random:tiny\nlora:\n  rank: 8\n  dropout: 1.5\ntrain:\n  learning_rate: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["train.optim=adamw", "data.eval_ratio=2"])
    lines = str(e.value).splitlines()
    assert lines[0] == "5 problems in the configuration:" and len(lines) == 6
    assert [line.split(".", 1)[0].strip() for line in lines[1:]] == ["1", "2", "3", "4", "5"]
    for expected in [f"{f}, line 4: unknown key 'lora.rank'", f"{f}, line 5: lora.dropout=1.5",
                     f"{f}, line 7: train.learning_rate=5.0", "override 'train.optim=adamw': train.optim",
                     "override 'data.eval_ratio=2': data.eval_ratio=2.0"]:
        assert sum(expected in line for line in lines) == 1, (expected, lines)


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
    ("model.max_seq_length=600000", "up to 524288, past its 131,072 positions"),
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
    (["train.tiled_mlp=true", "train.gradient_checkpointing=false"], "save memory inside recomputed layers"),
    (["train.tiled_mlp=true", "model.backend=hf"], "the tiled MLP is Unsloth's"),
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
                               ("train.packing=true", "packing=true needs a CUDA GPU"),
                               ("train.tiled_mlp=true", "tiled_mlp=true needs a CUDA GPU")]:
        cfg = load_config(None, [override, "model.load_in_4bit=false"])
        with pytest.raises(ConfigError, match=expected):
            check_device(cfg, cuda=False, bf16_ok=False)
    with pytest.raises(ConfigError, match="QLoRA"):
        check_device(load_config(None), cuda=False, bf16_ok=False)
    check_device(load_config(None, ["train.optim=paged_adamw_8bit"]), cuda=True, bf16_ok=True)


def test_fp8_base_is_refused_where_it_cannot_train():
    fp8 = ["model.load_in_fp8=true", "model.load_in_4bit=false"]
    with pytest.raises(ConfigError, match="needs a CUDA GPU with FP8 matmuls"):
        check_device(load_config(None, fp8), cuda=False, bf16_ok=False)
    with pytest.raises(ConfigError, match="this GPU has no FP8 matmuls"):  # an A100
        check_device(load_config(None, fp8), cuda=True, bf16_ok=True, fp8_ok=False)
    check_device(load_config(None, fp8), cuda=True, bf16_ok=True, fp8_ok=True)
    with pytest.raises(ConfigError) as e:  # every problem at once, each with its setting
        load_config(None, ["model.load_in_fp8=true", "model.backend=hf"])
    assert "Add model.load_in_4bit=false" in str(e.value) and "model.backend=unsloth" in str(e.value)
    assert load_config(None, fp8).model.quantization == "fp8" and load_config(None).model.quantization == "nf4"


def test_missing_recipe_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_every_config_field_is_read_by_the_code():
    source = "\n".join(p.read_text() for p in (ROOT / "kit").rglob("*.py") if p.parent.name != "config")
    # the config reads its own fields in its checks, each section's below this line
    source += "".join(p.read_text().partition("# " + "-" * 64 + " validation")[2]
                      for p in (ROOT / "kit/config").glob("*.py"))
    passed_through = {f"train.{k}" for k in TrainConfig().training_arguments()}  # read by TRL, by name
    # a section is read as itself (cfg.lora.r) or through a name bound to it: `lo = cfg.lora`,
    # `t, m = cfg.train, cfg.model`, or a parameter annotated with its class (`t: TrainConfig`)
    aliases: dict[str, set[str]] = {}
    for targets, values in re.findall(r"^\s*(\w+(?:\s*,\s*\w+)*)\s*=\s*(\w+\.\w+(?:\s*,\s*\w+(?:\.\w+)*)*)\s*(?:#.*)?$",
                                      source, re.M):
        for name, value in zip(re.split(r"\s*,\s*", targets), re.split(r"\s*,\s*", values)):
            if value.count(".") == 1:
                aliases.setdefault(value.split(".")[1], set()).add(name)

    def read(key: str) -> bool:
        section, field = key.split(".", 1)
        cls = type(getattr(Config(), section)).__name__
        names = {section} | aliases.get(section, set()) | set(re.findall(rf"\b(\w+)\s*:\s*[\"']?{cls}\b", source))
        return bool(re.search(rf"\b(?:{'|'.join(map(re.escape, sorted(names)))})\.{re.escape(field)}\b", source))

    assert not read("lora.name") and not read("data.strip"), "the match is the dotted access, not a word"
    unread = [k for k in all_keys() if k not in passed_through and not read(k)]
    assert not unread, f"config fields no code reads: {unread}"


def test_train_fields_pass_through_to_sft_config_by_name_or_are_kit_only():
    from trl import SFTConfig

    from kit.run.rundir import RunDir
    from kit.train.backend import Backend, Device
    from kit.train.plan import execution
    from kit.train.trainer import sft_config
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in TRAIN_KIT_ONLY or f.name in sft_fields, f"train.{f.name}: not an SFTConfig field, not kit-only"
    cfg = load_config(None, ["train.per_device_eval_batch_size=3", "train.lr_scheduler_type=cosine",
                             "train.weight_decay=0.01", "train.save_total_limit=2", "train.seed=7",
                             "train.warmup_ratio=0.2", "train.max_steps=9", "train.eval_steps=5"])
    how = execution(cfg, None, cuda=False, card_gib=None, steps=9)
    args = sft_config(cfg, Backend("hf", Device("cpu", "cpu", False), "fp32"), RunDir(ROOT / "runs" / "unused"), how)
    for name in {f.name for f in dataclasses.fields(TrainConfig)} - set(TRAIN_KIT_ONLY):  # every field, by name
        assert getattr(args, name) == getattr(cfg.train, name), name
    assert (args.per_device_eval_batch_size, args.lr_scheduler_type, args.weight_decay, args.seed, args.max_steps,
            args.eval_steps) == (3, "cosine", 0.01, 7, 9, 5), "the overrides, as set"
    assert args.warmup_steps == 0.2 and args.gradient_checkpointing is False
    assert args.train_sampling_strategy == how.sampling == "random"  # auto on CPU: the guide's random batches
    assert args.padding_free is how.padding_free is False


def test_yaml_bare_no_means_the_strategy_no(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  eval_strategy: no\n  save_strategy: no\n")
    cfg = load_config(f, ["train.eval_strategy=no"])
    assert cfg.train.eval_strategy == "no" and cfg.train.save_strategy == "no"


@pytest.mark.parametrize("override, trackers", [
    ("train.report_to=wandb", ["wandb"]),
    ("train.report_to=[tensorboard, wandb, mlflow]", ["tensorboard", "wandb", "mlflow"]),
    ("train.report_to=none", []),
    ("train.report_to=[]", []),
])
def test_report_to_takes_one_tracker_or_a_list(override, trackers):
    assert load_config("demo", [override]).train.trackers == trackers


def test_report_to_problems_name_the_closest_tracker():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["train.report_to=[tensorbord, none]", "train.sample_prompts=-1",
                             "train.sample_max_new_tokens=0"])
    text = str(e.value)
    assert "4 problems" in text and "'tensorbord' is not a tracker" in text and "Did you mean 'tensorboard'" in text
    assert "'none' beside trackers" in text and "train.sample_prompts=-1" in text
    assert "train.sample_max_new_tokens=0" in text


def test_trackers_but_tensorboard_reach_sft_config_report_to_by_name():
    from kit.run.rundir import RunDir
    from kit.train.backend import Backend, Device
    from kit.train.plan import execution
    from kit.train.trainer import sft_config
    backend = Backend("hf", Device("cpu", "cpu", False), "fp32")
    for report_to, expected in (("[tensorboard, wandb, mlflow]", ["wandb", "mlflow"]), ("tensorboard", []),
                                ("none", [])):
        cfg = load_config("demo", [f"train.report_to={report_to}", "run.name=tracked"])
        how = execution(cfg, None, cuda=False, card_gib=None, steps=9)
        args = sft_config(cfg, backend, RunDir(ROOT / "runs" / "unused"), how)
        assert args.report_to == expected and args.run_name == "tracked", report_to


def test_help_config_lists_every_setting_with_its_default():
    res = subprocess.run([sys.executable, "-m", "kit.recipes.llama31_sft", "--help-config"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    listed, section = set(), None
    for line in res.stdout.splitlines():
        if re.fullmatch(r"\w+:", line):
            section = line[:-1]
        elif found := re.fullmatch(r"  (\w+) = (.*)", line):  # a section's own key (a mixture entry's: deeper)
            listed.add((section, found[1], found[2]))
    defaults = Config()
    expected = {(s.name, f.name, repr(getattr(getattr(defaults, s.name), f.name)))
                for s in dataclasses.fields(Config) for f in dataclasses.fields(getattr(defaults, s.name))}
    assert listed == expected
