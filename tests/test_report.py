"""Run-directory records that do not need training."""
from kit.train import report


def test_command_line_records_what_the_user_typed():
    sft = "kit.recipes.llama31_sft"
    assert report.command_line(["/usr/bin/kit", "train", "--config", "my recipe.yaml", "train.learning_rate=2e-4"],
                               module=sft) == "kit train --config 'my recipe.yaml' train.learning_rate=2e-4"
    assert report.command_line(["/x/kit/cli.py", "train", "--config", "a.yaml"], module=sft) == \
        "kit train --config a.yaml"
    direct = report.command_line(["/x/kit/recipes/llama31_sft.py", "--config", "a.yaml"], module=sft)
    assert direct.endswith("-m kit.recipes.llama31_sft --config a.yaml") and direct.startswith("python")

