"""The progress bar's redraw interval: ``LOG_INTERVAL_S`` into a log (a Ray job's, CI's), tqdm's own at a
terminal, a caller's own where given."""
import io

from sparserm.progress import LOG_INTERVAL_S, progress_bar


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_log_is_redrawn_every_interval_and_a_terminal_as_tqdm_does(monkeypatch):
    for tty, interval, most in ((False, LOG_INTERVAL_S, LOG_INTERVAL_S), (True, 0.1, 10.0)):
        stream = _Stream(tty)
        monkeypatch.setattr("sys.stderr", stream)
        with progress_bar(total=200, desc="job", file=stream) as bar:
            # the monitor thread's forced redraw too (a job's log got a line every 10-15 s, not 30)
            assert (bar.mininterval, bar.maxinterval) == (interval, most)
            for _ in range(200):
                bar.update(1)
        assert "200/200" in stream.getvalue()  # the last state is drawn on close, in both
        monkeypatch.setattr("sys.stderr", _Stream(False))
        assert progress_bar(total=1, mininterval=5.0).mininterval == 5.0  # a caller's own stays
