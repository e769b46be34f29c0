"""Progress off a terminal: one line per update, never wrapped, with rate and ETA."""

from __future__ import annotations

import pytest

from monoscope import progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def test_log_lines_off_a_terminal_carry_an_eta_and_stay_on_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", clock)
    assert not progress.console.is_terminal  # pytest's captured stderr is not a terminal
    with progress.progress_bar("train", total=10_000, unit="tok") as bar:
        for step in range(1, 4):
            clock.now += 11  # past the 10 s log interval
            bar.update(1_000, loss=f"{0.5 / step:.4f}", fvu="0.2345", l0="32.0", dead=f"{step}/9216",
                       aux_loss="0.0123", lr="1.5e-03", grad_norm="0.812")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "train: 1,000/10,000 tok (91 tok/s, ETA 1m39s) loss=0.5000 fvu=0.2345 l0=32.0 dead=1/9216 aux_loss=0.0123 "
        "lr=1.5e-03 grad_norm=0.812",
        "train: 2,000/10,000 tok (91 tok/s, ETA 1m28s) loss=0.2500 fvu=0.2345 l0=32.0 dead=2/9216 aux_loss=0.0123 "
        "lr=1.5e-03 grad_norm=0.812",
        "train: 3,000/10,000 tok (91 tok/s, ETA 1m17s) loss=0.1667 fvu=0.2345 l0=32.0 dead=3/9216 aux_loss=0.0123 "
        "lr=1.5e-03 grad_norm=0.812",
    ]


def test_lines_are_rate_limited_and_an_unknown_total_has_no_eta(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    monkeypatch.setattr(progress, "time", clock)
    with progress.progress_bar("capture", total=None, unit="tok") as bar:
        for _ in range(5):
            clock.now += 3
            bar.update(100)  # lines at 12 s only (every 10 s)
    assert capsys.readouterr().err.splitlines() == ["capture: 400 tok (33 tok/s)"]
    with progress.progress_bar("capture", total=100, unit="tok", enabled=False) as bar:
        clock.now += 60
        bar.update(50)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59.6, "1m00s"), (185, "3m05s"), (7620, "2h07m")])
def test_format_seconds(seconds: float, text: str) -> None:
    assert progress.format_seconds(seconds) == text
