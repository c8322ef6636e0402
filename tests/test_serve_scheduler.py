"""The batcher without HTTP or threads: grouping by key, the batch ceiling, the wait for company, FIFO across
groups, deadlines, stops and the queue bound, driven with made-up clock values."""

from __future__ import annotations

from kolors_trt.serve.scheduler import DEADLINE, DISCONNECTED, Job, Scheduler

A = (64, 64, 4, True)  # (height, width, steps, cfg)
B = (64, 96, 4, True)
C = (64, 64, 4, False)


def job(key, t, images=1, timeout=100.0, name=""):
    return Job(key, images, t, t + timeout, payload=name)


def names(jobs):
    return [j.payload for j in jobs]


def sched(max_queue=100, wait=0.05, most=4):
    return Scheduler(max_queue, wait, lambda key: most)


def test_compatible_jobs_coalesce_up_to_the_ceiling_in_arrival_order():
    s = sched(most=3)
    for i in range(5):
        assert s.push(job(A, 0.001 * i, name=f"a{i}"))
    d = s.poll(0.005)  # full at once: no waiting
    assert names(d.batch) == ["a0", "a1", "a2"] and d.wait_s is None
    d = s.poll(0.006)  # two left, not full, the oldest waited 2 ms of 50
    assert d.batch == [] and abs(d.wait_s - 0.047) < 1e-9
    assert names(s.poll(0.0531).batch) == ["a3", "a4"]
    assert len(s) == 0 and s.poll(1.0).wait_s is None


def test_images_count_against_the_ceiling_and_a_smaller_later_job_fills_the_room():
    s = sched(most=4)
    s.push(job(A, 0.0, images=3, name="x3"))
    s.push(job(A, 0.1, images=2, name="y2"))
    s.push(job(A, 0.2, images=1, name="z1"))
    assert names(s.poll(0.2).batch) == ["x3", "z1"]  # y2 does not fit beside x3; z1 does
    assert names(s.poll(0.2).batch) == ["y2"]  # now the oldest; it waited 100 ms > 50 ms


def test_a_job_bigger_than_the_ceiling_still_runs_alone():
    s = sched(most=1)
    s.push(job(A, 0.0, images=2, name="big"))
    assert names(s.poll(0.0).batch) == ["big"]


def test_fifo_across_groups_the_oldest_job_picks_the_next_batch():
    s = sched(most=4)
    for i, key in enumerate([B, A, A, C, B, A]):
        s.push(job(key, 0.01 * i, name=f"{'ABC'[[A, B, C].index(key)]}{i}"))
    order = []
    for _ in range(10):  # bounded: six jobs leave in at most six batches
        d = s.poll(10.0)
        if not d.batch:
            break
        order.append(names(d.batch))
    assert order == [["B0", "B4"], ["A1", "A2", "A5"], ["C3"]]


def test_no_starvation_a_lone_job_waits_at_most_max_wait_under_a_stream_of_others():
    s = sched(most=2, wait=0.05)
    s.push(job(C, 0.0, name="lonely"))
    t, ran = 0.0, []
    for i in range(20):  # a steady stream of group A arriving every 10 ms
        t = 0.01 * i
        s.push(job(A, t, name=f"a{i}"))
        d = s.poll(t)
        ran += names(d.batch)
        if "lonely" in ran:
            break
    assert "lonely" in ran and t <= 0.05 + 1e-9


def test_past_their_deadline_jobs_leave_the_queue_without_running():
    s = sched(wait=0.5)
    s.push(job(A, 0.0, timeout=1.0, name="short"))
    s.push(job(A, 0.0, timeout=10.0, name="long"))
    d = s.poll(0.2)
    assert d.batch == [] and d.wait_s == 0.3  # next event: the end of the wait for company
    d = s.poll(1.0)
    assert names(d.dropped) == ["short"] and d.dropped[0].stop_reason == DEADLINE
    assert names(d.batch) == ["long"]


def test_the_wait_ends_at_the_earliest_deadline():
    s = sched(wait=5.0)
    s.push(job(A, 0.0, timeout=0.25))
    assert s.poll(0.0).wait_s == 0.25


def test_stopped_jobs_are_dropped_and_the_rest_still_batch():
    s = sched(most=4)
    jobs = [job(A, 0.0, name=f"a{i}") for i in range(3)]
    for j in jobs:
        s.push(j)
    jobs[1].stop(DISCONNECTED)
    jobs[1].stop(DEADLINE)  # the first reason stays
    d = s.poll(1.0)
    assert names(d.dropped) == ["a1"] and d.dropped[0].stop_reason == DISCONNECTED
    assert names(d.batch) == ["a0", "a2"]


def test_a_full_queue_refuses_and_hurry_skips_the_wait():
    s = sched(max_queue=2, wait=1.0)
    assert s.push(job(A, 0.0)) and s.push(job(B, 0.0))
    assert not s.push(job(A, 0.0)) and len(s) == 2
    assert s.poll(0.0).batch == []
    assert len(s.poll(0.0, hurry=True).batch) == 1
    assert len(s.take_all()) == 1 and len(s) == 0


def test_the_applied_lora_set_goes_first_within_the_wait_window():
    """prefer(key): a batch that needs no LoRA swap may run before the oldest job's, when it arrived within
    max_wait_s of it; then the oldest leads. A later preferred job does not pass it."""
    plain, ink = A + (None,), A + ((("sha-ink", 0.8),),)
    applied = {"key": ink}
    s = Scheduler(100, 0.05, lambda key: 4, prefer=lambda key: key == applied["key"])
    s.push(job(plain, 0.00, name="p0"))
    s.push(job(ink, 0.01, name="i1"))
    s.push(job(plain, 0.02, name="p2"))
    s.push(job(ink, 0.30, name="i3"))  # arrived long after p0's window
    assert names(s.poll(0.06).batch) == ["i1", "i3"]  # ink is applied: its batch runs when p0's would have
    applied["key"] = plain  # the worker ran the ink batch... and then the plain one swaps back
    assert names(s.poll(0.06).batch) == ["p0", "p2"]
    s = Scheduler(100, 0.05, lambda key: 4, prefer=lambda key: key == ink)
    s.push(job(plain, 0.00, name="p0"))
    s.push(job(ink, 0.10, name="i1"))  # outside p0's window of 50 ms: p0 keeps its turn
    assert names(s.poll(0.10).batch) == ["p0"]
