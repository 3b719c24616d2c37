"""ptilab on a real Dask cluster: a `dask scheduler` and two `dask worker`
processes on localhost, every verdict compared with the run in this process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ptilab.scan.batch import audit_images, scan_images
from tests.scan.images import write_fleet_image

pytest.importorskip("distributed")
START_TIMEOUT = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    src = os.path.abspath("src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.path.abspath("."), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """tcp://127.0.0.1:PORT of a scheduler with two single-threaded workers, stopped afterwards."""
    from dask.distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path_factory.mktemp("dask")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=open(logs / "scheduler.log", "w"))]
    try:
        for i in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--no-dashboard", "--name", f"w{i}",
                                           "--local-directory", str(logs)], env=_env(),
                                          stdout=subprocess.DEVNULL, stderr=open(logs / f"worker{i}.log", "w")))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with Client(address, timeout="5s") as client:
                    client.wait_for_workers(2, timeout=max(1, deadline - time.monotonic()))
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    return [write_fleet_image(str(d / f"guest{i}.elf"), processes=i + 1).path for i in range(3)]


def _transitions(address: str) -> dict:
    from dask.distributed import Client
    with Client(address, timeout="5s") as client:
        return client.run(lambda dask_worker: dask_worker.state.transition_counter)


def _verdicts(scans) -> list:
    return [[(s.kernel_pgd, s.user_pgd, s.kind, s.verdict, [f.as_dict() for f in s.findings]) for s in r.spaces]
            for r in scans]


def test_scanning_several_images_on_the_cluster_gives_the_local_verdicts(scheduler, images):
    local = scan_images(images, None, workers=0)
    before = _transitions(scheduler)
    remote = scan_images(images, None, scheduler=scheduler)
    after = _transitions(scheduler)
    assert _verdicts(remote) == _verdicts(local)
    assert all(after[w] > before[w] for w in before), "both workers ran tasks"


def test_one_image_split_into_chunks_across_the_workers_gives_the_local_verdicts(scheduler, images):
    local = scan_images(images[2:], None, workers=0)
    before = _transitions(scheduler)
    remote = scan_images(images[2:], None, scheduler=scheduler, chunk_frames=1 << 14)  # 16 chunks of 64 MiB
    after = _transitions(scheduler)
    assert _verdicts(remote) == _verdicts(local)
    assert all(after[w] > before[w] for w in before)


def test_auditing_several_images_on_the_cluster_gives_the_local_verdicts(scheduler, images):
    local = audit_images(images, None, None, None, workers=0)
    remote = audit_images(images, None, None, None, scheduler=scheduler)
    assert remote == local


def test_the_cli_on_the_cluster_prints_a_json_list_and_fails_as_the_local_run_does(scheduler, images):
    run = lambda *extra: subprocess.run([sys.executable, "-m", "ptilab.cli", "scan", *images, "--json", *extra],
                                        capture_output=True, text=True, env=_env(), timeout=180)
    remote, local = run("--scheduler", scheduler), run("--workers", "0")
    assert remote.returncode == local.returncode == 1, remote.stderr  # each image has the planted process
    strip = lambda doc: [{k: v for k, v in d.items() if k != "seconds"} for d in doc]
    assert strip(json.loads(remote.stdout)) == strip(json.loads(local.stdout))
    assert [d["image"] for d in json.loads(remote.stdout)] == images


def test_an_unreachable_scheduler_is_one_line_and_exit_2(images):
    port = _free_port()
    run = subprocess.run([sys.executable, "-m", "ptilab.cli", "scan", *images, "--scheduler",
                          f"tcp://127.0.0.1:{port}"], capture_output=True, text=True, env=_env(), timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("ptilab: error: --scheduler") and run.stderr.count("\n") == 1


def test_a_sparse_image_is_large_by_the_data_it_holds_not_its_length(tmp_path):
    """A 64 GiB sparse file holding 1 MiB is scanned in this process: its holes are not read."""
    from ptilab.scan.batch import image_bytes
    from ptilab.scan.cluster import LARGE_IMAGE_BYTES

    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(64 << 30)
        f.seek(5 << 30)
        f.write(b"\1" * (1 << 20))
    assert (1 << 20) <= image_bytes(str(path)) < LARGE_IMAGE_BYTES <= path.stat().st_size


class _Slow:
    """A task taking `seconds` each, noting where it ran."""

    def __init__(self, seconds: float):
        self.seconds, self.here = seconds, []

    def __call__(self, item):
        time.sleep(self.seconds)
        self.here.append(item)
        return item * 2


def _fake_cluster(monkeypatch) -> list:
    from contextlib import contextmanager

    from ptilab.scan import cluster

    started = []

    @contextmanager
    def fake(what, scheduler=None, workers=None):
        started.append((scheduler, workers))
        yield lambda fn, items: [item * 2 for item in items]
    monkeypatch.setattr(cluster, "dask_runner", fake)
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 2)
    return started


def test_light_work_stays_in_this_process_whatever_the_number_of_items(monkeypatch):
    from ptilab.scan.cluster import map_items

    started, task = _fake_cluster(monkeypatch), _Slow(0.001)
    assert map_items("auditing", task, list(range(40))) == [2 * i for i in range(40)]
    assert started == [] and task.here == list(range(40))


def test_heavy_work_goes_to_a_local_cluster_after_the_first_item_is_timed(monkeypatch):
    from ptilab.scan import cluster

    monkeypatch.setattr(cluster, "CLUSTER_START_SECONDS", 0.05)
    started, task = _fake_cluster(monkeypatch), _Slow(0.03)
    # The rest would take 5 x 0.03 s here, half that on 2 workers: more than the (patched) start-up.
    assert cluster.map_items("scanning", task, list(range(6))) == [2 * i for i in range(6)]
    assert started == [(None, None)] and task.here == [0]


def test_workers_or_a_scheduler_decide_without_measuring(monkeypatch):
    from ptilab.scan.cluster import map_items

    started, task = _fake_cluster(monkeypatch), _Slow(0)
    map_items("x", task, [1, 2], workers=3)
    map_items("x", task, [1, 2], scheduler="tcp://h:1")
    assert started == [(None, 3), ("tcp://h:1", None)] and task.here == []
    assert map_items("x", task, [1, 2], workers=0) == [2, 4] and task.here == [1, 2]
