"""EventStorage and its three writers, checked against hand-computed values and the files they write."""

import json
import logging
import math
import statistics

import pytest
import torch

from dino_research.utils.events import (
    CommonMetricPrinter,
    EventStorage,
    JSONWriter,
    TensorboardWriter,
    get_event_storage,
)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_history_and_smoothing():
    values = [5.0, 1.0, 4.0, 2.0, 8.0, 3.0, 7.0, 6.0, 0.5, 9.0]
    storage = EventStorage(start_iter=10)
    for i, v in enumerate(values):
        storage.iter = 10 + i
        storage.put_scalar("loss", torch.tensor(v))  # 0-dim tensor -> float
        storage.put_scalar("lr", v / 10, smoothing_hint=False)
    hist = storage.history("loss")
    assert hist.values() == [(v, 10 + i) for i, v in enumerate(values)]
    assert isinstance(hist.latest(), float) and hist.latest() == 9.0
    assert hist.median(4) == statistics.median(values[-4:])  # 4.75
    assert hist.median(5) == statistics.median(values[-5:])  # 6.0
    assert hist.avg(3) == pytest.approx(sum(values[-3:]) / 3)
    assert hist.global_avg() == pytest.approx(sum(values) / len(values))

    assert storage.latest() == {"loss": (9.0, 19), "lr": (0.9, 19)}
    smoothed = storage.latest_with_smoothing_hint(window=4)
    assert smoothed["loss"] == (statistics.median(values[-4:]), 19)
    assert smoothed["lr"] == (0.9, 19)  # no hint: the latest value, not a median


def test_history_is_bounded_but_global_avg_is_not():
    storage = EventStorage(max_length=5)
    for i in range(100):
        storage.iter = i
        storage.put_scalar("x", float(i))
    assert [it for _, it in storage.history("x").values()] == [95, 96, 97, 98, 99]
    assert storage.history("x").global_avg() == pytest.approx(49.5)


def test_put_scalars_and_errors():
    storage = EventStorage()
    storage.put_scalars(a=1, b=torch.tensor([2.5]), smoothing_hint=False)
    assert storage.latest() == {"a": (1.0, 0), "b": (2.5, 0)}
    with pytest.raises(ValueError, match="one element"):
        storage.put_scalar("c", torch.ones(2))
    with pytest.raises(ValueError, match="smoothing_hint"):
        storage.put_scalar("a", 2.0, smoothing_hint=True)
    with pytest.raises(KeyError, match="recorded"):
        storage.history("missing")


def test_get_event_storage_stack():
    with pytest.raises(RuntimeError, match="outside an EventStorage"):
        get_event_storage()
    with EventStorage(3) as outer:
        assert get_event_storage() is outer and outer.iter == 3
        with EventStorage() as inner:
            assert get_event_storage() is inner
        assert get_event_storage() is outer
    with pytest.raises(RuntimeError):
        get_event_storage()


def test_json_writer_new_scalars_only_and_resume(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    with EventStorage() as storage:
        writer = JSONWriter(str(path), window=2)
        writer.write()  # nothing put yet: no line, no crash
        assert path.read_text() == ""
        for it, loss in enumerate([4.0, 2.0, 6.0]):
            storage.iter = it
            storage.put_scalars(loss=loss)
            storage.put_scalar("lr", 0.1 * (it + 1), smoothing_hint=False)
        storage.put_scalar("knn_top1", 55.0, smoothing_hint=False)
        writer.write()
        storage.iter = 3
        storage.put_scalar("loss", float("nan"))
        writer.write()
        writer.write()  # nothing new since the last write: no line
        writer.close()
    lines = _read_jsonl(path)
    assert len(lines) == 2
    assert lines[0] == {"iteration": 2, "loss": 4.0, "lr": pytest.approx(0.3), "knn_top1": 55.0}  # median(2, 6)
    assert lines[1].keys() == {"iteration", "loss"} and lines[1]["iteration"] == 3
    assert math.isnan(lines[1]["loss"])  # median(6, nan) is nan, written as NaN and read back

    # Resume at iteration 4 with a new storage and writer: the same file continues.
    with EventStorage(start_iter=4) as storage:
        writer = JSONWriter(str(path))
        storage.put_scalar("loss", 1.5)
        writer.write()
        writer.close()
    lines = _read_jsonl(path)
    assert len(lines) == 3 and lines[2] == {"iteration": 4, "loss": 1.5}


def test_json_writer_groups_scalars_by_iteration(tmp_path):
    path = tmp_path / "metrics.json"
    with EventStorage() as storage:
        writer = JSONWriter(str(path))
        storage.iter = 7
        storage.put_scalar("eval/top1", 70.0)
        storage.iter = 8
        storage.put_scalar("loss", 3.0)
        writer.write()
        writer.close()
    assert _read_jsonl(path) == [{"iteration": 7, "eval/top1": 70.0}, {"iteration": 8, "loss": 3.0}]


def test_tensorboard_writer_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    writer = TensorboardWriter(str(log_dir), window=1)
    with EventStorage() as storage:
        writer.write()  # nothing put: no SummaryWriter, no file
        assert not log_dir.exists()
        expected = {}
        for it in range(5):
            storage.iter = it
            storage.put_scalars(loss=10.0 - it, lr=0.01 * it)
            expected[it] = (10.0 - it, 0.01 * it)
            if it % 2 == 0:
                writer.write()
        writer.write()
        writer.write()
    writer.close()
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr"]
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    lr = {e.step: e.value for e in acc.Scalars("lr")}
    assert sorted(loss) == [0, 2, 4]  # one event per write, at the scalar's iteration, no repeats
    for step in loss:
        assert loss[step] == pytest.approx(expected[step][0])
        assert lr[step] == pytest.approx(expected[step][1])


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def printed():
    logger = logging.getLogger("dino_research")
    handler, old_level = _ListHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_printer_eta_and_fields(printed):
    printer = CommonMetricPrinter(max_iter=20, window=5)
    with EventStorage() as storage:
        printer.write()  # nothing put yet
        assert printed == []
        for it in range(10):  # iterations 0..9 done, 10..19 remain: 10 x 2.0 s
            storage.iter = it
            storage.put_scalars(loss=9.1234, time=2.0, data_time=0.012)
            storage.put_scalars(lr=5e-4, wd=0.04, momentum=0.99612, smoothing_hint=False)
        storage.put_scalar("inf_metric", float("inf"))
        printer.write()
        printer.write()  # nothing new: no second line
    assert len(printed) == 1
    line = printed[0]
    assert line.startswith("eta: 0:00:20  iter: 9/20  loss: 9.123  lr: 5.0e-04  wd: 0.04  momentum: 0.9961")
    assert "inf_metric: inf" in line
    assert line.index("data_time: 0.012") < line.index("  time: 2")
    assert ("max_mem:" in line) == torch.cuda.is_available()


def test_printer_eta_uses_median_time(printed):
    printer = CommonMetricPrinter(max_iter=100, window=3)
    with EventStorage() as storage:
        for it, t in enumerate([50.0, 1.0, 3.0, 2.0]):
            storage.iter = it
            storage.put_scalar("time", t)
        printer.write()
    # median(1, 3, 2) = 2 s/iter, 100 - 3 - 1 = 96 iterations left -> 192 s
    assert printed[0].startswith("eta: 0:03:12  iter: 3/100")


def test_printer_without_time_scalar(printed):
    printer = CommonMetricPrinter(max_iter=10)
    with EventStorage() as storage:
        storage.put_scalar("loss", 1.0)
        printer.write()  # no "time", no previous write: no ETA, still a line
    assert printed[0].startswith("iter: 0/10  loss: 1")
