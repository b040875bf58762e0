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



def test_summary_sets_the_host_peak_beside_the_offloaded_checkpoints_estimate():
    import dataclasses
    run = {f.name: 0 for f in dataclasses.fields(report.Result)}
    run.update(model="random:8b", chat_format="llama3", backend="unsloth", precision="bf16", quantization="nf4",
               device="NVIDIA H200", devices=1, peak_kind="GPU, allocated", batches="1 x 1", attention="-",
               loss_kernel="-", train_loss=None, best_eval_loss=None, best_eval_step=None, peak_gib=22.09,
               estimate_gib=22.15, host_peak_gib=40.26, host_estimate_gib=None)
    assert "host memory" not in report.summary(report.Result(**run))
    run["host_estimate_gib"] = 32.0
    assert "host memory         40.3 GiB (process RSS); estimated 32.0 pinned for the offloaded checkpoints" in \
        report.summary(report.Result(**run))
