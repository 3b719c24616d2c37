import os
import subprocess
import sys
import threading

import pytest

from ptilab.errors import InputError
from ptilab.files import open_input, require_image_file
from ptilab.formats.textfile import read_lines


def test_a_fifo_nobody_writes_to_reads_as_empty_instead_of_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = []
    reader = threading.Thread(target=lambda: done.append(open_input(fifo).read()), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert done == [b""]


def test_a_pipe_with_a_writer_reads_as_usual():
    read_end, write_end = os.pipe()
    os.write(write_end, b"line one\nline two\n")
    os.close(write_end)
    assert [line for _, line in read_lines(f"/dev/fd/{read_end}", "text")] == ["line one", "line two"]
    os.close(read_end)


@pytest.mark.parametrize("make, kind", [(os.mkfifo, "a pipe"), (os.mkdir, "a directory")])
def test_an_image_must_be_a_regular_file_or_a_block_device(tmp_path, make, kind):
    make(tmp_path / "x")
    with pytest.raises(InputError, match=f"x: {kind}"):
        require_image_file(tmp_path / "x")
    with pytest.raises(InputError, match="a character device"):
        require_image_file("/dev/null")


@pytest.mark.parametrize("command", [["dump"], ["audit"], ["scan"], ["audit", "--ptdump"]])
def test_the_cli_given_a_fifo_says_so_and_does_not_hang(tmp_path, command):
    os.mkfifo(tmp_path / "fifo")
    done = subprocess.run([sys.executable, "-m", "ptilab.cli", *command, str(tmp_path / "fifo")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("ptilab: error: ") and done.stderr.count("\n") == 1
