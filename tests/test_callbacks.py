from kit.train.callbacks import OverfitAlarm


def test_alarm_when_eval_rises_while_train_falls_names_best_step():
    a = OverfitAlarm(patience=2)
    seq = [(10, 2.0, 2.5), (20, 1.5, 2.0), (30, 1.6, 1.5), (40, 1.8, 1.0)]
    alarms = [a.observe(*s) for s in seq]
    assert alarms[:3] == [None, None, None]
    assert alarms[3]["best_step"] == 20 and alarms[3]["best_eval_loss"] == 1.5
    assert "step 20" in alarms[3]["message"] and "checkpoint-20" in alarms[3]["message"]
    assert a.observe(50, 1.9, 0.8) is None  # same rising stretch: warned once


def test_no_alarm_when_train_loss_also_rises_or_eval_recovers():
    a = OverfitAlarm(patience=2)
    assert [a.observe(*s) for s in [(1, 1.0, 1.0), (2, 1.1, 1.1), (3, 1.2, 1.2)]] == [None] * 3
    b = OverfitAlarm(patience=2)
    assert [b.observe(*s) for s in [(1, 1.0, 2.0), (2, 1.1, 1.5), (3, 1.05, 1.0)]] == [None] * 3


def test_incomplete_checkpoints_are_set_aside_not_resumed(tmp_path):
    from kit.run.rundir import COMPLETE, complete_checkpoints
    for step, done in [(4, True), (8, True), (12, False)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
        if done:
            (d / COMPLETE).write_text(str(step))
    found = complete_checkpoints(tmp_path)
    assert [d.name for d in found] == ["checkpoint-4", "checkpoint-8"]
    assert not (tmp_path / "checkpoint-12").exists() and (tmp_path / ".incomplete-checkpoint-12").is_dir()
