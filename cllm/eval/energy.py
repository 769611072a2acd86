"""CPU package energy from Linux RAPL counters (/sys/class/powercap/intel-rapl:N/energy_uj), where readable.

Machines without the counters (most VMs, this one included) get `None`: energy is reported as null, never
estimated.
"""

from __future__ import annotations

from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


def _packages(root: Path) -> list[Path]:
    """Top-level RAPL domains (packages: intel-rapl:0, intel-rapl:1; not the sub-domains intel-rapl:0:0)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1 and (p / "energy_uj").is_file())


class EnergyMeter:
    """Accumulates joules over `start()`/`stop()` spans; `joules` is None when the counters cannot be read."""

    def __init__(self, root: Path | str = POWERCAP):
        self.domains = []
        for p in _packages(Path(root)):
            try:
                int((p / "energy_uj").read_text())
            except (OSError, ValueError):  # present but unreadable (root-only since 2020 on many kernels)
                continue
            wrap = p / "max_energy_range_uj"
            self.domains.append((p / "energy_uj", int(wrap.read_text()) if wrap.is_file() else None))
        self.joules: float | None = 0.0 if self.domains else None
        self._start: list[int] | None = None

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def _read(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self.domains]

    def start(self) -> None:
        if self.domains:
            self._start = self._read()

    def stop(self) -> None:
        if not self.domains or self._start is None:
            return
        total = 0
        for (_, wrap), a, b in zip(self.domains, self._start, self._read()):
            total += b - a if b >= a or wrap is None else b + wrap - a  # the counter wrapped around
        self.joules += total / 1e6
        self._start = None
