"""
meter.database: one SQLite connection with group commits on the reactor
thread, a turn after the work was submitted.  The Database runs on a
task.Clock: advancing it by 0 is the reactor's next turn.
"""

from __future__ import annotations

import sqlite3

import attrs
import pytest
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults

from meter.database import Database, RowInsert, connect, insert_telling_new


@attrs.define
class Turns:
    """
    A Database on a Clock, with the path of its file.
    """

    database: Database
    clock: task.Clock
    path: object

    def next_turn(self) -> None:
        """
        Let the reactor's next turn run: the commit waiting for it, and
        (as a Clock runs what becomes due while it advances) those of work
        submitted by its callbacks.
        """
        self.clock.advance(0)

    def rows(self) -> list[int]:
        return rows(self.path)


def on_a_clock(path) -> Turns:
    connection = connect(path)
    connection.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER PRIMARY KEY)")
    clock = task.Clock()
    return Turns(Database(connection, clock), clock, path)


@pytest.fixture
def turns(tmp_path):
    turns = on_a_clock(tmp_path / "db" / "t.sqlite")
    yield turns
    stopped = turns.database.stop()
    turns.next_turn()
    assert stopped.called


def result(d: Deferred):
    """
    What C{d} fired with; it must have fired, and not with a failure.
    """
    outcome = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def insert(x):
    def work(connection):
        connection.execute("INSERT INTO t VALUES (?)", (x,))
        return x

    return work


def noop(connection):
    return None


def rows(path) -> list[int]:
    # A separate connection sees only what was committed.
    with sqlite3.connect(str(path)) as other:
        return [x for (x,) in other.execute("SELECT x FROM t ORDER BY x")]


def test_connect_makes_the_folder_and_a_durable_wal(tmp_path):
    connection = connect(tmp_path / "a" / "b" / "x.sqlite")
    try:
        assert (tmp_path / "a" / "b" / "x.sqlite").exists()
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        connection.close()


def test_run_fires_with_the_result_after_the_commit(turns):
    d = turns.database.run(insert(7))
    assert not d.called
    turns.next_turn()
    assert result(d) == 7
    assert turns.rows() == [7]
    assert (turns.database.commits, turns.database.pieces) == (1, 1)


def test_work_submitted_during_a_commit_shares_the_next_transaction(turns):
    db = turns.database
    deferreds = [db.run(insert(x)) for x in range(20)]
    turns.next_turn()
    assert result(gatherResults(deferreds)) == list(range(20))
    # All 20 in the reactor's next turn.
    assert (db.commits, db.pieces) == (1, 20)
    assert turns.rows() == list(range(20))
    # An idle database commits the next piece on its own.
    d = db.run(insert(20))
    turns.next_turn()
    assert result(d) == 20
    assert (db.commits, db.pieces) == (2, 21)


def test_with_a_commit_interval_work_waits_for_it_and_shares_one_transaction(tmp_path):
    # A fleet reporting at once brings a chunk or two a reactor turn: within
    # the interval after a transaction began, the turns' chunks wait for the
    # next one together, so the fsyncs a second are bounded by the interval.
    connection = connect(tmp_path / "t.sqlite")
    connection.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    clock = task.Clock()
    clock.advance(100.0)
    database = Database(connection, clock, commit_interval=0.002)
    # Idle, the first piece goes at the next turn: no wait.
    first = database.run(insert(0))
    clock.advance(0)
    assert result(first) == 0
    assert database.commits == 1
    # One piece a turn, each 0.5 ms after the last: none is committed
    # before the interval after the last transaction's start is over.
    deferreds = []
    for x in range(1, 4):
        clock.advance(0.0005)
        deferreds.append(database.run(insert(x)))
        clock.advance(0)
        assert not any(d.called for d in deferreds)
    assert database.commits == 1
    clock.advance(0.0005)
    assert [result(d) for d in deferreds] == [1, 2, 3]
    assert (database.commits, database.pieces) == (2, 4)
    assert rows(tmp_path / "t.sqlite") == [0, 1, 2, 3]
    # Once an interval has passed since the last began, a piece goes at the
    # next turn again.
    clock.advance(0.002)
    last = database.run(insert(4))
    clock.advance(0)
    assert result(last) == 4
    assert database.commits == 3
    stopped = database.stop()
    assert stopped.called


def test_a_stop_waits_out_the_commit_interval_and_commits(tmp_path):
    connection = connect(tmp_path / "t.sqlite")
    connection.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    clock = task.Clock()
    database = Database(connection, clock, commit_interval=0.01)
    database.run(insert(0))
    clock.advance(0)
    waiting = database.run(insert(1))
    stopped = database.stop()
    clock.advance(0.005)
    assert not stopped.called
    clock.advance(0.005)
    assert result(waiting) == 1
    assert stopped.called
    assert rows(tmp_path / "t.sqlite") == [0, 1]


def test_a_negative_commit_interval_is_refused(tmp_path):
    connection = connect(tmp_path / "t.sqlite")
    try:
        with pytest.raises(ValueError, match="commit_interval"):
            Database(connection, task.Clock(), commit_interval=-0.001)
    finally:
        connection.close()


def test_a_failing_piece_rolls_back_only_itself(turns):
    db = turns.database

    def bad(connection):
        connection.execute("INSERT INTO t VALUES (2)")
        raise ValueError("boom")

    first, failing, third = db.run(insert(1)), db.run(bad), db.run(insert(3))
    turns.next_turn()
    assert result(first) == 1
    with pytest.raises(ValueError, match="boom"):
        result(failing)
    assert result(third) == 3
    assert db.commits == 1
    assert turns.rows() == [1, 3]


def test_a_failed_transaction_fails_every_piece_of_it(turns):
    db = turns.database
    blocker = db.run(noop)

    def ends_the_transaction(connection):
        connection.execute("ROLLBACK")

    first, breaking = db.run(insert(5)), db.run(ends_the_transaction)
    turns.next_turn()
    for d in (blocker, first, breaking):  # the blocker in the same transaction as the others
        with pytest.raises(sqlite3.OperationalError):
            result(d)
    assert turns.rows() == []
    # the database carries on
    d = db.run(insert(6))
    turns.next_turn()
    assert result(d) == 6
    assert turns.rows() == [6]


def insert_many(connection, xs):
    connection.executemany("INSERT INTO t VALUES (?)", [(x,) for x in xs])
    return [x * 10 for x in xs]


def test_run_many_joins_neighbouring_items_into_one_piece(turns):
    db = turns.database
    calls = []

    def recorded(connection, xs):
        calls.append(list(xs))
        return insert_many(connection, xs)

    first = [db.run_many(recorded, x) for x in (1, 2, 3)]
    between = db.run(insert(4))
    second = [db.run_many(recorded, x) for x in (5, 6)]
    turns.next_turn()
    assert result(gatherResults(first + [between] + second)) == [10, 20, 30, 4, 50, 60]
    # Items joined only with their neighbours: the order of work is kept.
    assert calls == [[1, 2, 3], [5, 6]]
    assert (db.commits, db.pieces) == (1, 6)
    assert turns.rows() == [1, 2, 3, 4, 5, 6]


def test_run_many_that_raises_fails_each_of_its_items_only(turns):
    db = turns.database

    def duplicates(connection, xs):
        return insert_many(connection, xs + [xs[0]])  # the primary key refuses

    before = db.run(insert(1))
    failing = [db.run_many(duplicates, x) for x in (7, 8)]
    after = db.run(insert(9))
    turns.next_turn()
    assert result(before) == 1
    for d in failing:
        with pytest.raises(sqlite3.IntegrityError):
            result(d)
    assert result(after) == 9
    assert turns.rows() == [1, 9]


def test_run_many_must_answer_each_item(turns):
    def one_short(connection, xs):
        return insert_many(connection, xs)[:-1]

    short = [turns.database.run_many(one_short, x) for x in (1, 2)]
    turns.next_turn()
    for d in short:
        with pytest.raises(RuntimeError, match="1 results for 2 items"):
            result(d)
    assert turns.rows() == []


def test_flush_of_an_idle_database_fires_at_once(turns):
    assert turns.database.flush().called


def test_flush_waits_for_everything_submitted(turns):
    db = turns.database
    deferreds = [db.run(insert(x)) for x in range(5)]
    flushed = db.flush()
    assert not flushed.called
    turns.next_turn()
    assert flushed.called
    assert all(d.called for d in deferreds)


def test_work_submitted_from_a_result_callback_is_committed_before_flush(turns):
    # The gateway submits work from the callbacks of committed work (a chunk
    # committed closes its round; a round closed takes the next batch).
    db = turns.database
    first = db.run(noop)
    a, b = db.run(noop), db.run(noop)  # one group with first
    later = {}

    def on_a(_):
        later["x"] = db.run(insert(1))

    def on_b(_):
        later["y"] = db.run(insert(2))
        later["flush"] = db.flush()

    a.addCallback(on_a)
    b.addCallback(on_b)
    turns.next_turn()
    assert first.called and a.called and b.called
    assert later["flush"].called
    assert later["x"].called and later["y"].called, "flush fired before work submitted ahead of it was committed"
    # x and y arrived during one commit's callbacks: one transaction for both.
    assert db.commits == 2
    assert turns.rows() == [1, 2]


def test_stop_finishes_submitted_work_then_closes(tmp_path):
    turns = on_a_clock(tmp_path / "t.sqlite")
    deferreds = [turns.database.run(insert(x)) for x in range(3)]
    stopped = turns.database.stop()
    assert not stopped.called
    turns.next_turn()
    assert stopped.called
    assert all(d.called for d in deferreds)
    assert turns.rows() == [0, 1, 2]
    with pytest.raises(sqlite3.ProgrammingError):
        turns.database._connection.execute("SELECT 1")


def test_on_the_reactor_work_waits_for_the_next_turn_and_shares_its_transaction(tmp_path):
    # The gateway's datagrams read in one turn are spooled in one transaction
    # after it: nothing runs while they are still being submitted.
    turns = on_a_clock(tmp_path / "t.sqlite")
    database = turns.database
    deferreds = [database.run(insert(x)) for x in range(3)]
    assert turns.rows() == []
    assert not any(d.called for d in deferreds)
    turns.clock.advance(0)
    assert turns.rows() == [0, 1, 2]
    assert [d.result for d in deferreds] == [0, 1, 2]
    assert (database.commits, database.pieces) == (1, 3)
    stopped = database.stop()
    assert stopped.called
    with pytest.raises(sqlite3.ProgrammingError):
        database._connection.execute("SELECT 1")


def test_a_full_database_fails_the_group_with_its_own_cause(tmp_path):
    # SQLite rolls the whole transaction back when the disk is full: every
    # piece fails saying so, not with the savepoint the rollback took away.
    clock = task.Clock()
    path = tmp_path / "t.sqlite"
    connection = connect(path)
    connection.execute("CREATE TABLE t (x INTEGER PRIMARY KEY, padding BLOB)")
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    connection.execute(f"PRAGMA max_page_count = {pages + 1}")
    database = Database(connection, clock)

    def big(x):
        def work(connection):
            connection.execute("INSERT INTO t VALUES (?, zeroblob(100000))", (x,))

        return work

    deferreds = [database.run(insert(1)), database.run(big(2))]
    clock.advance(0)
    causes = []
    for d in deferreds:
        d.addErrback(lambda f: causes.append(f.getErrorMessage()))
    assert causes == ["database or disk is full"] * 2
    assert rows(path) == []


# -- RowInsert and insert_telling_new: plain functions on a connection ---------

ROWS = RowInsert("INSERT INTO pairs", 2, "ON CONFLICT DO NOTHING")


def pairs_table(tmp_path) -> sqlite3.Connection:
    connection = sqlite3.connect(tmp_path / "pairs.sqlite", isolation_level=None)
    connection.execute("CREATE TABLE pairs (k INTEGER PRIMARY KEY, v REAL NOT NULL)")
    return connection


def flat(rows) -> list:
    return [value for row in rows for value in row]


def test_row_insert_writes_every_row_of_blocks_that_are_not_a_power_of_two(tmp_path):
    # 4096 + 2048 + ... : 6,001 rows span the largest block and several
    # smaller ones, each its own statement.
    connection = pairs_table(tmp_path)
    rows = [(k, k / 3) for k in range(6001)]
    ROWS.run(connection, flat(rows))
    assert connection.execute("SELECT k, v FROM pairs ORDER BY k").fetchall() == rows
    assert ROWS.statement(2) == "INSERT INTO pairs VALUES (?,?),(?,?) ON CONFLICT DO NOTHING"


def test_row_insert_of_no_rows_does_nothing(tmp_path):
    connection = pairs_table(tmp_path)
    ROWS.run(connection, [])
    assert connection.execute("SELECT count(*) FROM pairs").fetchone() == (0,)


def test_insert_telling_new_says_which_rows_were_stored_before(tmp_path):
    connection = pairs_table(tmp_path)
    ROWS.run(connection, flat([(1, 0.5), (4500, 9.0)]))
    rows = [(k, float(k)) for k in range(5000)]
    new = insert_telling_new(connection, ROWS, flat(rows))
    assert [k for k, fresh in enumerate(new) if not fresh] == [1, 4500]
    # The rows stored before keep their values; every other row is there once.
    stored = dict(connection.execute("SELECT k, v FROM pairs"))
    assert len(stored) == 5000 and stored[1] == 0.5 and stored[4500] == 9.0 and stored[4499] == 4499.0


def test_insert_telling_new_of_all_new_rows_says_so_in_one_pass(tmp_path):
    connection = pairs_table(tmp_path)
    statements = []
    connection.set_trace_callback(statements.append)
    assert insert_telling_new(connection, ROWS, flat([(1, 1.0), (2, 2.0), (3, 3.0)])) == [True] * 3
    assert [s.split(" VALUES")[0] for s in statements if s.startswith("INSERT")] == ["INSERT INTO pairs"] * 2


def test_a_connection_has_the_page_cache_it_is_given(tmp_path):
    # [cloud] cache_mb: the readings' interior pages stay in the cache.
    assert connect(tmp_path / "given.sqlite", cache_mb=16).execute("PRAGMA cache_size").fetchone() == (-16 * 1024,)
    assert connect(tmp_path / "default.sqlite").execute("PRAGMA cache_size").fetchone() == (-2000,)


def test_the_clouds_readings_database_opens_with_its_configured_cache(tmp_path):
    from twisted.internet import reactor

    from meter.cloud.tap import ReadingsDatabase

    service = ReadingsDatabase(tmp_path / "cloud.sqlite", reactor, cache_mb=48)
    service.startService()
    try:
        assert service._store._connection.execute("PRAGMA cache_size").fetchone() == (-48 * 1024,)
    finally:
        service.database._connection.close()
