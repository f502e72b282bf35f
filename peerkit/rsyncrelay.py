"""rsync's remote shell for peerkit: hand the remote command to the peerkit process that runs rsync.

rsync starts its remote shell as ``RELAY HOST COMMAND...``; peerkit makes
that ``python -I -S rsyncrelay.py FD``, where FD is one end of a socket pair
the peerkit process keeps the other end of.  The relay sends the words and
its own stdin and stdout (rsync's pipes) over FD in one message, and exits
with the exit status the peerkit process answers once the remote command
ended (255, as ssh does, when there is none).  The peerkit process checks the
command and runs it on its already-authenticated SSH connection, moving the
bytes itself: no second login, and nothing here but a hand-over.

Started once per transfer with ``-I -S``, and waited for: rsync opens no
channel until this process has handed its command over.  So it imports only
os, sys and ``_socket``, the C module under ``socket``: ``socket`` itself
(with selectors, enum and functools) doubled the interpreter's start, from
about 8 ms to 14 ms.
"""

import _socket
import os
import sys

_NO_STATUS = 255


def main(argv: list) -> int:
    """Hand ``argv[2:]`` and fds 0 and 1 to the socket ``argv[1]``; return the status it answers."""
    if len(argv) < 3 or not argv[1].isdigit():
        os.write(2, b"peerkit rsync relay: run by peerkit's rsync only\n")
        return _NO_STATUS
    sock = _socket.socket(fileno=int(argv[1]))
    words = b"\0".join(os.fsencode(word) for word in argv[2:])
    # What socket.send_fds sends: both fds as C ints in one SCM_RIGHTS message.
    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1))
    sock.sendmsg([words], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
    # rsync must see the end of its pipes when the peerkit process closes
    # them, not when this process exits: keep no copy.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    answer = sock.recv(16)
    return int(answer) if answer.isdigit() and int(answer) < 256 else _NO_STATUS


if __name__ == "__main__":
    os._exit(main(sys.argv))
