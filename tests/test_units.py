import pytest

from edge_runtime.errors import BadInput
from edge_runtime.units import parse_duration_ms, parse_size_mb


@pytest.mark.parametrize("text,mb", [("1.8GB", 1800.0), ("150MB", 150.0), ("1GiB", 1073.741824), ("512 KB", 0.512)])
def test_sizes(text, mb):
    assert parse_size_mb(text) == pytest.approx(mb)


@pytest.mark.parametrize("text,ms", [("200ms", 200.0), ("0.2s", 200.0), ("1500us", 1.5), ("15 ms", 15.0)])
def test_durations(text, ms):
    assert parse_duration_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "fast", "200", "1.8 parsecs", "-5MB", "0MB", "1.8GBs"])
def test_bad_sizes_refused(text):
    with pytest.raises(BadInput, match="memory budget"):
        parse_size_mb(text)


@pytest.mark.parametrize("text", ["200", "soon", "10 min", "0ms"])
def test_bad_durations_refused(text):
    with pytest.raises(BadInput, match="latency budget"):
        parse_duration_ms(text)
