"""SIGTERM stops a run of many stages between stages, with a message, also through Lightning's own SIGTERM handler
(which alone lets a ``predict`` stage finish and the next stage start)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from spr_lightning import quickstart
from spr_lightning.stop_request import StopRequest


@pytest.fixture(autouse=True)
def _sigterm_ignored_outside():
    """Without a StopRequest a SIGTERM here must fail the test, not kill pytest: ignore it outside one."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGTERM, previous)


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class _Linear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def predict_step(self, batch, batch_idx):
        return self.layer(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SigtermAtBatch(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            _sigterm_self()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            _sigterm_self()


def _trainer(callback: Callback) -> Trainer:
    return Trainer(accelerator="cpu", max_steps=50, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(40, 2)), batch_size=2)


def test_first_sigterm_is_recorded_and_check_stops_with_the_stage_name():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest("prog") as stop:
        stop.check("world")  # nothing asked yet: no stop
        _sigterm_self()
        assert stop.requested
        with pytest.raises(SystemExit, match=r"\[prog\] stopped on SIGTERM after world"):
            stop.check("world")
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigterm_stops_at_once():
    with StopRequest("prog"):
        _sigterm_self()
        with pytest.raises(SystemExit, match="second SIGTERM"):
            _sigterm_self()


def test_stage_names_lightnings_silent_exit_and_leaves_other_exits_alone():
    with StopRequest("prog") as stop:
        with pytest.raises(SystemExit) as plain, stop.stage("sft"):
            raise SystemExit(3)  # not asked to stop: passes unchanged
        assert plain.value.code == 3
        stop.requested = True
        with pytest.raises(SystemExit, match="during sft") as named, stop.stage("sft"):
            raise SystemExit  # what Lightning's SIGTERMException is
        assert isinstance(named.value.code, str)
        with pytest.raises(SystemExit, match="own words"), stop.stage("sft"):
            raise SystemExit("own words")


def test_lightning_fit_stops_at_the_next_step_and_says_so():
    trainer = _trainer(_SigtermAtBatch(2))
    with StopRequest("prog") as stop, pytest.raises(SystemExit, match="during fit"), stop.stage("fit"):
        trainer.fit(_Linear(), _loader())
    assert stop.requested
    assert trainer.global_step < 10


def test_lightning_predict_runs_to_its_end_then_check_stops():
    trainer = _trainer(_SigtermAtBatch(1))
    with StopRequest("prog") as stop:
        with stop.stage("predict"):
            predictions = trainer.predict(_Linear(), _loader())
        assert len(predictions) == 20  # Lightning's predict loop does not look at SIGTERM
        assert stop.requested  # ... but our handler, chained behind Lightning's, saw it
        assert signal.getsignal(signal.SIGTERM) == stop._on_sigterm  # and the Trainer gave the handler back
        with pytest.raises(SystemExit, match="after predict"):
            stop.check("predict")


def test_quickstart_marks_the_interrupted_stage_done_and_starts_no_other(tmp_path, monkeypatch):
    ran: list[str] = []

    def fake(stage):
        def run(_run):
            ran.append(stage)
            if stage == "vision":
                _sigterm_self()
            return {}
        return run

    monkeypatch.setattr(quickstart, "STAGE_FUNCTIONS", {stage: fake(stage) for stage in quickstart.STAGES})
    with pytest.raises(SystemExit, match=r"\[quickstart\] stopped on SIGTERM after vision"):
        quickstart.run_quickstart(tmp_path / "run", size="toy")
    assert ran == ["world", "vision"]
    assert (tmp_path / "run" / "vision" / "DONE").is_file()
    assert not (tmp_path / "run" / "base").exists()
    ran.clear()
    with pytest.raises(SystemExit):  # a rerun goes on from the next stage (and is stopped again here)
        monkeypatch.setitem(quickstart.STAGE_FUNCTIONS, "base", lambda _run: _sigterm_self() or {})
        quickstart.run_quickstart(tmp_path / "run", size="toy")
    assert ran == []
    assert (tmp_path / "run" / "base" / "DONE").is_file()


def test_shapes_experiment_stops_after_the_stage_that_saw_sigterm(tmp_path):
    from spr_lightning.experiments.shapes import ShapesExperiment

    experiment = ShapesExperiment(tmp_path, "toy", seeds=[0], arms=["sft"])
    ran: list[str] = []

    def stage(name, sigterm=False):
        def run(_run):
            ran.append(name)
            if sigterm:
                _sigterm_self()
            return {"x": 1}
        return run

    with experiment.stop:
        assert experiment.stage(experiment.shared, "world", stage("world"), "shared") == {"x": 1}
        with pytest.raises(SystemExit, match=r"\[shapes\] stopped on SIGTERM after shared: clip"):
            experiment.stage(experiment.shared, "clip", stage("clip", sigterm=True), "shared")
    assert ran == ["world", "clip"]
    assert (tmp_path / "clip" / "DONE").is_file()
