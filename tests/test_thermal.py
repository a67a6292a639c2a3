"""Temperature and power readers (assistant/thermal.py), with readings laid out as a Jetson gives them.

No Jetson is here, so the sysfs tree is rebuilt in tmp_path with the kernel's real layout
(`/sys/class/thermal/thermal_zoneN` → `../../devices/virtual/thermal/thermal_zoneN`, with `type`,
`temp` in millidegrees, and cooling devices beside them), and jtop's answer is a `jetson.stats` dict in
the shape jetson-stats 7.2 builds it (jtop/jtop.py, `stats`). These stand-ins are the only ones in the
suite: everything else reads the real machine.
"""
from __future__ import annotations

import datetime as dt
import json
import socket

import pytest

from assistant import thermal
from assistant.daemon import Sensors

# Zone names as L4T r36 names them on an Orin (jetson-stats shows them as cpu, gpu, cv0 … tj); the CV
# clusters are powered off when idle and read -256 °C.
ORIN_ZONES = [("cpu-thermal", 47531), ("gpu-thermal", 46218), ("cv0-thermal", -256000),
              ("cv1-thermal", -256000), ("cv2-thermal", -256000), ("soc0-thermal", 45906),
              ("soc1-thermal", 46031), ("soc2-thermal", 44812), ("tj-thermal", 47968)]

# `jetson.stats` on an Orin Nano at 15 W: temperatures in °C, power rails and total in milliwatts.
ORIN_STATS = {"time": dt.datetime(2026, 11, 30, 2, 14, 5), "uptime": dt.timedelta(hours=3, minutes=2),
              "CPU1": 12, "CPU2": 4, "CPU3": 7, "CPU4": 3, "CPU5": "OFF", "CPU6": "OFF",
              "RAM": 0.413, "SWAP": 0.0, "EMC": 8, "GPU": 0.0, "APE": "OFF", "NVDEC": "OFF",
              "NVJPG": "OFF", "Fan pwmfan0": 31.4,
              "Temp cpu": 48.5, "Temp cv0": -256, "Temp cv1": -256, "Temp cv2": -256, "Temp gpu": 47.2,
              "Temp soc0": 46.8, "Temp soc1": 47.0, "Temp soc2": 45.6, "Temp tj": 48.9,
              "Power VDD_CPU_GPU_CV": 921, "Power VDD_SOC": 1301, "Power TOT": 4410,
              "jetson_clocks": "OFF", "nvp model": "15W"}


def fake_sysfs(root, zones):
    """`root`/class/thermal as the kernel lays it out: symlinks into devices/virtual/thermal."""
    devices = root / "devices/virtual/thermal"
    links = root / "class/thermal"
    links.mkdir(parents=True)
    for index, (kind, millidegrees) in enumerate(zones):
        zone = devices / f"thermal_zone{index}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        if millidegrees is not None:
            (zone / "temp").write_text(f"{millidegrees}\n")
        (zone / "mode").write_text("enabled\n")
        (zone / "policy").write_text("step_wise\n")
        (links / zone.name).symlink_to(f"../../devices/virtual/thermal/{zone.name}")
    cooling = devices / "cooling_device0"
    cooling.mkdir(parents=True)
    (cooling / "type").write_text("pwm-fan\n")
    (cooling / "cur_state").write_text("2\n")
    (links / cooling.name).symlink_to("../../devices/virtual/thermal/cooling_device0")
    return links


def unix_socket(path):
    """A real listening Unix socket where jetson-stats keeps its own."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def test_sysfs_gives_the_hottest_zone_in_degrees_skipping_powered_off_zones(tmp_path):
    reading = thermal.read_sysfs(fake_sysfs(tmp_path, ORIN_ZONES))
    assert (reading.celsius, reading.sensor, reading.source) == (47.968, "tj-thermal", "sysfs")


def test_sysfs_ignores_the_nano_pmic_zone_that_always_reads_100_degrees(tmp_path):
    nano = [("AO-therm", 36500), ("CPU-therm", 38000), ("GPU-therm", 36000), ("PLL-therm", 35250),
            ("PMIC-Die", 100000), ("thermal-fan-est", 37100)]
    reading = thermal.read_sysfs(fake_sysfs(tmp_path, nano))
    assert (reading.celsius, reading.sensor) == (38.0, "CPU-therm")


def test_sysfs_skips_zones_it_cannot_read(tmp_path):
    links = fake_sysfs(tmp_path, [("cpu-thermal", None), ("gpu-thermal", 51000), ("soc0-thermal", 40000)])
    (links / "thermal_zone2/temp").write_text("not a number\n")
    assert thermal.read_sysfs(links).celsius == 51.0
    assert thermal.read_sysfs(tmp_path / "no-such-dir") is None


def test_jtop_stats_give_the_hottest_zone_and_the_board_power():
    reading = thermal.from_jtop_stats(ORIN_STATS)
    assert (reading.celsius, reading.sensor, reading.source, reading.watts) == (48.9, "tj", "jtop", 4.41)
    assert "48.9 °C (tj, from jetson-stats), 4.4 W" == reading.describe()


def test_the_jetson_stats_service_is_preferred_where_its_socket_exists(tmp_path):
    links = fake_sysfs(tmp_path, ORIN_ZONES)
    with unix_socket(tmp_path / "jtop.sock"):
        reading = thermal.read(jtop_socket=tmp_path / "jtop.sock", thermal_root=links,
                               jtop_client=lambda: ORIN_STATS)
    assert (reading.source, reading.celsius, reading.watts) == ("jtop", 48.9, 4.41)


def test_without_the_socket_jtop_is_never_asked(tmp_path):
    def client():
        raise AssertionError("jtop was asked although its socket does not exist")

    reading = thermal.read(jtop_socket=tmp_path / "jtop.sock", thermal_root=fake_sysfs(tmp_path, ORIN_ZONES),
                           jtop_client=client)
    assert (reading.source, reading.note) == ("sysfs", None)


def test_a_socket_without_the_jetson_stats_package_falls_back_to_sysfs_and_says_why(tmp_path):
    try:   # the real import must fail here: jetson-stats is an optional extra
        import jtop  # noqa: F401
        pytest.skip("jetson-stats is installed here")
    except ImportError:
        pass
    with unix_socket(tmp_path / "jtop.sock"):
        reading = thermal.read(jtop_socket=tmp_path / "jtop.sock", thermal_root=fake_sysfs(tmp_path, ORIN_ZONES))
    assert reading.source == "sysfs" and reading.celsius == 47.968
    assert "jetson-stats is not installed" in reading.note and "[jetson]" in reading.note


def test_a_jetson_stats_service_that_refuses_falls_back_with_its_reason(tmp_path):
    def client():   # what jtop raises when the host's service and the container's client differ
        raise RuntimeError("Mismatch version jtop service: [4.2.12] and client: [4.3.2]. Please run:\n\n"
                           "sudo jtop --install-service")

    with unix_socket(tmp_path / "jtop.sock"):
        reading = thermal.read(jtop_socket=tmp_path / "jtop.sock", thermal_root=fake_sysfs(tmp_path, ORIN_ZONES),
                               jtop_client=client)
    assert reading.source == "sysfs"
    assert reading.note == ("jetson-stats did not answer (Mismatch version jtop service: [4.2.12] and client: "
                            "[4.3.2]. Please run:)")


def test_jtop_power_is_kept_when_its_temperatures_are_all_offline(tmp_path):
    stats = {"Temp cv0": -256, "Power TOT": 5120}
    with unix_socket(tmp_path / "jtop.sock"):
        reading = thermal.read(jtop_socket=tmp_path / "jtop.sock", thermal_root=fake_sysfs(tmp_path, ORIN_ZONES),
                               jtop_client=lambda: stats)
    assert (reading.source, reading.celsius, reading.watts) == ("sysfs", 47.968, 5.12)


def test_the_daemon_reads_temperature_through_these_readers():
    assert Sensors().temperature_c() == thermal.read().celsius


def test_daemon_status_says_where_the_temperature_came_from(ember):
    report = json.loads(ember("daemon", "status", "--json").out)["temperature"]
    assert report["source"] in ("jtop", "sysfs", "psutil", "none")
    line = next(line for line in ember("daemon", "status").out.splitlines() if line.startswith("temperature"))
    assert line == "temperature " + thermal.Reading(**report).describe()
