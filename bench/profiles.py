"""
Profiles of the daemons under load: py-spy sampling a running daemon (all
its threads, without stopping it: --nonblocking), written as collapsed
stacks, and summarised here as the functions where the samples fall.

    python bench/profiles.py bench/results/profile-gateway.txt

py-spy is optional (pip install -e '.[bench]'); without it the bench runs
unprofiled.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \((?P<tid>[^)]*)\)(?:: (?P<name>.*))?$")

#: Where a sample's time goes, judged by the innermost frame matching: the
#: first rule (in this order) that matches any frame of the stack, searched
#: from the leaf outwards.
CATEGORIES = [
    ("sqlite",
     re.compile(r"Database\._transaction|RowInsert|insert_telling_new|immediate_transaction|"
                r"Spool\.\w+\.<locals>\.work|_insert\.<locals>\.work|sqlite3|Spool\.open")),
    ("logging (twisted.logger)", re.compile(r"twisted/logger/|twisted/python/log\.py:(?!98|82)")),
    ("console print (cloud)", re.compile(r"console_text|_console \(|console_line")),
    ("HMAC seal/verify", re.compile(r"\b(seal|unseal|tag_ok)\b|hmac\.py")),
    ("wire decode", re.compile(r"\bdecode\b.*meter/wire/|_decode_|meter/wire/.*_number|_records")),
    ("wire encode", re.compile(r"\bencode\b.*meter/wire/|_batch_record|_day_record|_checksum")),
    ("Reading objects (attrs + validators)", re.compile(r"meter/reading\.py|attrs|<attrs generated")),
    ("TLS", re.compile(r"twisted/protocols/tls\.py|OpenSSL")),
    ("gateway/cloud logic", re.compile(r"meter/(gateway|cloud)/")),
    ("thread hand-off (waking the reactor, GIL waits)",
     re.compile(r"_UnixWaker\.wakeUp|callFromThread|Condition\.(wait|notify)|threadpool|_threads/")),
    ("Deferred machinery", re.compile(r"twisted/internet/defer\.py|meter/database\.py")),
    ("reactor and sockets", re.compile(r"twisted/internet/|twisted/python/")),
]


def _parse_frame(text: str) -> tuple[str, str]:
    match = _FRAME.match(text)
    if match is None:
        return text, ""
    file = match.group("file")
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return match.group("func"), file


def read_collapsed(path: Path) -> list[tuple[str, list[str], int]]:
    """
    (thread name, frames outermost first, samples) of a py-spy raw file.
    """
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = body.split(";")
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            match = _THREAD.match(frames[0])
            thread = (match.group("name") or match.group("tid")) if match else frames[0]
            frames = frames[1:]
        elif frames and frames[0].startswith("process "):
            frames = frames[1:]
        stacks.append((thread, frames, int(count)))
    return stacks


def summarise(path: Path, top: int = 15) -> dict:
    stacks = read_collapsed(path)
    total = sum(count for _, _, count in stacks) or 1
    by_thread: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    meter_inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    for thread, frames, count in stacks:
        by_thread[_thread_kind(thread, frames)] += count
        names = []
        for frame in frames:
            func, file = _parse_frame(frame)
            names.append(f"{func} ({file})")
        if names:
            self_time[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
            if "(meter/" in name:
                meter_inclusive[name] += count
        categories[_category(frames)] += count

    def pct(counter: Counter, n: int = top) -> list[list]:
        return [[name, round(100 * c / total, 1)] for name, c in counter.most_common(n)]

    return {
        "samples": total,
        "threads_pct": pct(by_thread),
        "categories_pct": pct(categories, len(CATEGORIES) + 2),
        "self_pct": pct(self_time),
        "meter_inclusive_pct": pct(meter_inclusive),
    }


def _thread_kind(thread: str, frames: list[str]) -> str:
    # Both daemons commit on the reactor thread; any other thread is named.
    if thread == "MainThread" or any("mainLoop" in frame for frame in frames):
        return "reactor thread"
    return thread


#: Wrappers that say nothing of where the time goes: their caller decides.
_TRANSPARENT = re.compile(r"^(untilConcludes|callWithContext|callWithLogger|ContextTracker\.callWithContext|"
                          r"ThreadedContextTracker\.callWithContext) ")


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        if _TRANSPARENT.match(frame):
            continue
        for name, rule in CATEGORIES:
            if rule.search(frame):
                return name
    return "other (interpreter, idle polls)"


class Spy:
    """
    py-spy recording one process until L{stop}.
    """

    def __init__(self, pid: int, out: Path, rate: int = 200):
        self.out = out
        binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.process = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
             "--nonblocking", "--full-filenames", "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def available() -> bool:
    return bool(shutil.which("py-spy") or os.access(Path(sys.executable).parent / "py-spy", os.X_OK))


def format_summary(name: str, summary: dict) -> str:
    lines = [f"{name}: {summary['samples']} samples"]
    for title, key in (("threads", "threads_pct"), ("where the time goes", "categories_pct"),
                       ("self time (innermost function)", "self_pct"),
                       ("meter functions, inclusive", "meter_inclusive_pct")):
        lines.append(f"  {title}:")
        lines.extend(f"    {share:5.1f}%  {label}" for label, share in summary[key])
    return "\n".join(lines)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(format_summary(argument, summarise(Path(argument))))
