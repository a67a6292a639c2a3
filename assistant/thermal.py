"""How hot the machine is (and, on a Jetson, what it draws), from the best source it has.

In order: the jetson-stats service (`jtop`, through its socket `/run/jtop.sock`), which reads the
Jetson's thermal zones and its INA3221 power rails; the kernel's thermal zones in sysfs
(`/sys/class/thermal/thermal_zone*/{type,temp}`, millidegrees), which every Jetson and most Linux
machines have, in a container too; then psutil (hwmon, and the macOS/BSD sensors). The daemon waits
while the hottest reading is over its limit; `ember daemon status` says which source it came from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

JTOP_SOCKET = Path("/run/jtop.sock")
THERMAL_ROOT = Path("/sys/class/thermal")
# jetson-stats and the Jetson kernel report a zone that is powered off (the CV clusters of an Orin
# when idle) as -256 °C; anything that cold is not a temperature.
OFFLINE_C = -256.0
# On the Jetson Nano and TX family the PMIC-Die zone reads a fixed 100 °C (jetson-stats skips it too):
# counted, it would keep the daemon "too hot" for ever.
SKIPPED_ZONES = ("PMIC",)


@dataclasses.dataclass(frozen=True)
class Reading:
    """The hottest sensor, where it was read, and the board's power draw if the source knows it."""

    celsius: float | None
    source: str                  # "jtop", "sysfs", "psutil" or "none"
    sensor: str | None = None    # the hottest sensor's name as its source calls it
    watts: float | None = None   # total board power (jtop only)
    note: str | None = None      # why a better source was passed over

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for people: '48.9 °C (tj, from jetson-stats), 4.4 W'."""
        if self.celsius is None:
            text = "no temperature sensor found"
        else:
            names = {"jtop": "jetson-stats", "sysfs": "sysfs thermal zones", "psutil": "psutil"}
            text = f"{self.celsius:.1f} °C ({self.sensor}, from {names.get(self.source, self.source)})"
        if self.watts is not None:
            text += f", {self.watts:.1f} W"
        return text + (f"; {self.note}" if self.note else "")


def _hottest(values: Mapping[str, float]) -> tuple[str, float] | None:
    real = {name: value for name, value in values.items() if value > OFFLINE_C}
    if not real:
        return None
    name = max(real, key=real.__getitem__)
    return name, real[name]


def from_jtop_stats(stats: Mapping[str, Any]) -> Reading | None:
    """A reading from jtop's `jetson.stats` dict: "Temp <zone>" in °C, "Power TOT" in milliwatts."""
    temperatures = {key[len("Temp "):]: float(value) for key, value in stats.items()
                    if key.startswith("Temp ") and isinstance(value, (int, float))}
    hottest = _hottest(temperatures)
    power = stats.get("Power TOT")
    watts = float(power) / 1000 if isinstance(power, (int, float)) else None
    if hottest is None and watts is None:
        return None
    return Reading(hottest[1] if hottest else None, "jtop", hottest[0] if hottest else None, watts)


def _jtop_stats() -> Mapping[str, Any]:
    """One `jetson.stats` from the jetson-stats service (imported only here: an optional extra)."""
    from jtop import jtop

    with jtop() as jetson:   # start() waits for the service's first sample
        return jetson.stats


def read_jtop(socket: Path = JTOP_SOCKET,
              client: Callable[[], Mapping[str, Any]] = _jtop_stats) -> tuple[Reading | None, str | None]:
    """(reading, why not): jtop's reading where its socket exists, else why it was passed over."""
    if not socket.is_socket():   # a bind mount of a missing socket arrives as an empty directory
        return None, None
    try:
        stats = client()
    except ImportError:
        return None, ("the jetson-stats socket exists but jetson-stats is not installed: "
                      "pip install 'ember-assistant[jetson]'")
    except Exception as err:   # JtopException: service down, version mismatch, no permission
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return None, f"jetson-stats did not answer ({reason})"
    return from_jtop_stats(stats), None


def read_sysfs(root: Path = THERMAL_ROOT) -> Reading | None:
    """The hottest readable kernel thermal zone (`thermal_zone*/temp` in millidegrees, named by `type`)."""
    values: dict[str, float] = {}
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text(encoding="utf-8").strip() or zone.name
            millidegrees = int((zone / "temp").read_text(encoding="utf-8").strip())
        except (OSError, ValueError):
            continue   # a zone that cannot be read right now (powered off, EIO, no permission)
        if kind.startswith(SKIPPED_ZONES):
            continue
        values[kind if kind not in values else f"{kind} ({zone.name})"] = millidegrees / 1000
    hottest = _hottest(values)
    return Reading(hottest[1], "sysfs", hottest[0]) if hottest else None


def read_psutil() -> Reading | None:
    """psutil's hottest sensor (hwmon on Linux; the platform's sensors elsewhere)."""
    import psutil

    readings = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
    values = {f"{chip} {entry.label}".strip(): entry.current
              for chip, entries in readings.items() for entry in entries if entry.current}
    hottest = _hottest(values)
    return Reading(hottest[1], "psutil", hottest[0]) if hottest else None


def read(*, jtop_socket: Path = JTOP_SOCKET, thermal_root: Path = THERMAL_ROOT,
         jtop_client: Callable[[], Mapping[str, Any]] = _jtop_stats) -> Reading:
    """The machine's temperature from its best source: jetson-stats, then sysfs, then psutil."""
    reading, note = read_jtop(jtop_socket, jtop_client)
    if reading is not None and reading.celsius is not None:
        return reading
    fallback = read_sysfs(thermal_root) or read_psutil() or Reading(None, "none")
    watts = reading.watts if reading is not None else None   # jtop had power but no temperature
    return dataclasses.replace(fallback, watts=watts, note=note)
