"""
meter.device.survey: survey files, their grammar and their errors.
"""

from __future__ import annotations

import datetime

import pytest

from meter.device.survey import SurveyError, load_survey, parse_hhmm, parse_survey, survey_path
from meter.reading import Reading, ReadingError, format_number

DAY = datetime.date(2026, 3, 1)


def at(hhmm: str) -> datetime.datetime:
    hour, minute = map(int, hhmm.split(":"))
    return datetime.datetime(2026, 3, 1, hour, minute)


def parse(text: str):
    return parse_survey(text, "survey.txt", 3, "192.168.1.4", DAY)


# -- parsing ----------------------------------------------------------------


def test_report_format_parses_to_readings():
    readings = parse("08:00 - 20 - 30%\n12:00 - 25 - 33%\n16:00 - 23.5 - 32.25%\n20:00 - -4 - 0%\n")
    assert readings == (
        Reading(3, "192.168.1.4", at("08:00"), 20.0, 30.0),
        Reading(3, "192.168.1.4", at("12:00"), 25.0, 33.0),
        Reading(3, "192.168.1.4", at("16:00"), 23.5, 32.25),
        Reading(3, "192.168.1.4", at("20:00"), -4.0, 0.0),
    )


def test_blank_lines_comments_and_surrounding_space_are_skipped():
    text = "# device 3, March 1st\n\n   \n  08:00 - 20 - 30 %  \r\n# done\n"
    assert parse(text) == (Reading(3, "192.168.1.4", at("08:00"), 20.0, 30.0),)


def test_empty_survey_is_no_readings():
    assert parse("") == ()
    assert parse("# nothing measured\n") == ()


def test_readings_are_stamped_with_the_given_day_and_device():
    (reading,) = parse_survey("23:59 - 1 - 2%", "x", 7, "10.0.0.7", datetime.date(2025, 12, 31))
    assert reading.device_id == 7
    assert reading.device_ip == "10.0.0.7"
    assert reading.taken_at == datetime.datetime(2025, 12, 31, 23, 59)


@pytest.mark.parametrize(
    "line, value",
    [
        ("00:00 - -40 - 0%", (-40.0, 0.0)),
        ("23:59 - 85 - 100%", (85.0, 100.0)),
        ("12:00 - 0 - 50%", (0.0, 50.0)),
    ],
)
def test_bounds_are_inclusive(line, value):
    (reading,) = parse(line)
    assert (reading.temperature_c, reading.humidity_pct) == value


@pytest.mark.parametrize(
    "line, detail",
    [
        ("08:00 - 20 - 101%", "humidity 101% outside 0..100 %"),
        ("08:00 - 20 - -1%", "humidity -1% outside 0..100 %"),
        ("08:00 - 20 - 100.5%", "humidity 100.5% outside 0..100 %"),
        ("08:00 - 86 - 30%", "temperature 86 outside -40..85 °C"),
        ("08:00 - -40.5 - 30%", "temperature -40.5 outside -40..85 °C"),
        ("08:00 - nan - 30%", "temperature 'nan' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - inf - 30%", "temperature 'inf' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - -inf - 30%", "temperature '-inf' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - 20 - nan%", "humidity 'nan' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - 20 - inf%", "humidity 'inf' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - warm - 30%", "temperature 'warm' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - 20 - wet%", "humidity 'wet' is not a number (digits, an optional '-' and '.')"),
        # What float() takes but a survey's number is not
        ("08:00 - +5 - 30%", "temperature '+5' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - 1e1 - 30%", "temperature '1e1' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - 2_0 - 30%", "temperature '2_0' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - .5 - 30%", "temperature '.5' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - 5. - 30%", "temperature '5.' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - \uff12\uff10 - 30%", "temperature '\uff12\uff10' is not a number (digits, an optional '-' and '.')"),
        ("08:00 - 20 - \u0663\u0660%", "humidity '\u0663\u0660' is not a number (digits, an optional '-' and '.')"),
        ("0\u0668:00 - 20 - 30%", "time '0\u0668:00' is not HH:MM (00:00 to 23:59)"),
        ("08:00\u00a0- 20 - 30%", "expected 'HH:MM - temperature - humidity%', got '08:00\\xa0- 20 - 30%'"),
        ("08:00 - 20 - 30% # noon", "expected 'HH:MM - temperature - humidity%', got '08:00 - 20 - 30% # noon'"),
        ("\f", "expected 'HH:MM - temperature - humidity%', got '\\x0c'"),
        ("24:00 - 20 - 30%", "time '24:00' is not HH:MM (00:00 to 23:59)"),
        ("7:00 - 20 - 30%", "time '7:00' is not HH:MM (00:00 to 23:59)"),
        ("12:60 - 20 - 30%", "time '12:60' is not HH:MM (00:00 to 23:59)"),
        ("noon - 20 - 30%", "time 'noon' is not HH:MM (00:00 to 23:59)"),
        ("08:00 - 20 - 30", "expected 'HH:MM - temperature - humidity%', got '08:00 - 20 - 30'"),
        ("08:00 20 30%", "expected 'HH:MM - temperature - humidity%', got '08:00 20 30%'"),
        ("08:00 - 20 - 30% extra", "expected 'HH:MM - temperature - humidity%', got '08:00 - 20 - 30% extra'"),
        # The wire carries six decimals: a survey finer than that is refused
        # here rather than by the gateway, where the day could never arrive.
        ("08:00 - 17.1234567 - 30%", "temperature '17.1234567' has more than 6 decimals"),
        ("08:00 - 17 - 30.0000001%", "humidity '30.0000001' has more than 6 decimals"),
        # counted as written, trailing zeros too
        ("08:00 - 17.5000000 - 30%", "temperature '17.5000000' has more than 6 decimals"),
    ],
)
def test_bad_line_is_refused_naming_file_and_line(line, detail):
    text = "# header\n06:00 - 20 - 30%\n" + line + "\n"
    with pytest.raises(SurveyError) as raised:
        parse(text)
    assert str(raised.value) == f"survey.txt:3: {detail}"


def test_the_survey_number_grammar():
    # leading zeros, a minus, up to six decimals; -0 is zero
    text = "00:00 - 07 - 030%\n00:01 - -0 - 0.000001%\n00:02 - -0.0 - 99.999999%\n00:03 - 17.500000 - 5.0%\n"
    readings = parse(text)
    assert [(r.temperature_c, r.humidity_pct) for r in readings] == [(7, 30), (0, 0.000001), (0, 99.999999), (17.5, 5)]
    assert [format_number(r.temperature_c) for r in readings] == ["7", "0", "0", "17.5"]


def test_lines_end_with_lf_or_cr_lf_and_keep_the_files_order():
    text = "\t16:00\t-\t23\t-\t32%\t\r\n  # a comment\t\r\n\r\n08:00 - 20 - 30%"
    assert [r.taken_at for r in parse(text)] == [at("16:00"), at("08:00")]
    # other line breaks str.splitlines() knows are not line ends here
    with pytest.raises(SurveyError) as raised:
        parse("08:00 - 20 - 30%\u202812:00 - 25 - 33%\n")
    assert str(raised.value).startswith("survey.txt:1: ")


def test_duplicate_time_is_refused_naming_both_lines():
    text = "08:00 - 20 - 30%\n12:00 - 25 - 33%\n\n08:00 - 21 - 31%\n"
    with pytest.raises(SurveyError) as raised:
        parse(text)
    assert str(raised.value) == "survey.txt:4: time 08:00 already read at line 1"


def test_a_full_day_of_minutes_is_accepted():
    lines = [f"{m // 60:02d}:{m % 60:02d} - 17 - 35%" for m in range(24 * 60)]
    readings = parse("\n".join(lines))
    assert len(readings) == 1440
    assert readings[0].taken_at == at("00:00")
    assert readings[-1].taken_at == at("23:59")


def test_parse_hhmm():
    assert parse_hhmm("00:00") == datetime.time(0, 0)
    assert parse_hhmm("23:59") == datetime.time(23, 59)
    for bad in ("24:00", "7:00", "12:60", "12:5", "1200", "12:00 ", "１２:00"):
        with pytest.raises(ReadingError):
            parse_hhmm(bad)


# -- files ------------------------------------------------------------------


def test_survey_path_in_a_folder_or_a_file(tmp_path):
    assert survey_path(tmp_path, 3) == tmp_path / "device3.txt"
    single = tmp_path / "mine.txt"
    single.write_text("")
    assert survey_path(single, 3) == single


def test_load_survey_reads_the_shipped_surveys(repo_root):
    readings = load_survey(repo_root / "surveys" / "device1.txt", 1, "192.168.1.2", DAY)
    assert readings[0] == Reading(1, "192.168.1.2", at("08:00"), 20.0, 30.0)
    assert len(readings) == 4


def test_load_survey_of_a_missing_file_names_it(tmp_path):
    missing = tmp_path / "device9.txt"
    with pytest.raises(SurveyError) as raised:
        load_survey(missing, 9, "10.0.0.9", DAY)
    assert str(raised.value).startswith(f"{missing}: cannot read survey:")


@pytest.mark.parametrize("text", ["", "\n  \n", "# nothing measured\n"])
def test_load_survey_refuses_a_file_without_readings_naming_it(tmp_path, text):
    # A survey holds the previous 24 hours: an empty one is not a day to send.
    path = tmp_path / "device1.txt"
    path.write_text(text)
    with pytest.raises(SurveyError) as raised:
        load_survey(path, 1, "192.168.1.2", DAY)
    assert str(raised.value) == f"{path}: no readings in it (an empty day is not sent)"


def test_load_survey_of_invalid_utf8_names_it(tmp_path):
    path = tmp_path / "device1.txt"
    path.write_bytes(b"08:00 - 20 - 30%\n\xff\xfe\n")
    with pytest.raises(SurveyError) as raised:
        load_survey(path, 1, "192.168.1.2", DAY)
    assert str(raised.value).startswith(f"{path}: cannot read survey:")


def test_load_survey_errors_name_the_path_and_line(tmp_path):
    path = tmp_path / "device1.txt"
    path.write_text("08:00 - 20 - 30%\n09:00 - 20 - 130%\n")
    with pytest.raises(SurveyError) as raised:
        load_survey(path, 1, "192.168.1.2", DAY)
    assert str(raised.value) == f"{path}:2: humidity 130% outside 0..100 %"


def test_six_decimals_are_accepted_and_kept():
    (reading,) = parse("08:00 - 17.123456 - 30.000001%\n")
    assert reading.console_line() == "192.168.1.4 - 08:00 - 17.123456 - 30.000001%"
