"""A stand-in for peer-shell on the source side, for fault and hostile-archive runs.

Installed (by tests/hostile/rig.py) as the forced command of the puller's
key line on the source instance, with its placeholders filled in.  It runs
as the source's owner, under the real sshd, exactly where peer-shell would:

* ``stream-app <slug> [--zstd]`` with a plan file ``plans/<slug>.json`` is
  served from the plan: a payload (a crafted or a real archive), cut at a
  byte offset, paced, stalled, and then ended in the planned way (exit
  status, killing itself, killing its sshd session, hanging until the
  client hangs up);
* ``ping`` / ``list-apps`` / ``app-info <slug>`` / ``with-app-info rsync …``
  are held for a few seconds when a hold file ``holds/<peer>.<verb>`` says
  so (to signal a pull in that stage);
* everything else execs the real peer-shell with the forced arguments.

Plan keys: payload (path), cut (bytes to send; default all), chunk, rate
(bytes/s), hold_before (s), stall_at/stall_for/stall_mark (bytes, s, a marker path
touched when the stall begins), after
("exit:N" | "kill-self" | "kill-session" | "hang"), pidfile, started (a
marker path touched before the first byte).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

DIR = "@DIR@"
PEER_SHELL = "@PEER_SHELL@"
SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def passthrough():
    os.execv(PEER_SHELL, [PEER_SHELL] + sys.argv[1:])


def write_all(data):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def sshd_session_pid():
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/comm") as fh:
            if fh.read().startswith("sshd"):
                return pid
        with open(f"/proc/{pid}/stat") as fh:
            pid = int(fh.read().rsplit(")", 1)[1].split()[1])
    return None


def serve(plan, zstd):
    with open(plan["payload"], "rb") as fh:
        data = fh.read()
    if zstd:
        data = subprocess.run(["zstd", "-q", "-c", "-1"], input=data, stdout=subprocess.PIPE,
                              check=True).stdout
    cut = len(data) if plan.get("cut") is None else min(int(plan["cut"]), len(data))
    if plan.get("pidfile"):
        with open(plan["pidfile"], "w") as fh:
            fh.write(str(os.getpid()))
    if plan.get("started"):
        open(plan["started"], "w").close()
    time.sleep(float(plan.get("hold_before", 0)))
    chunk = int(plan.get("chunk", 16384))
    rate = plan.get("rate")
    stall_at = plan.get("stall_at")
    sent = 0

    def stall():
        if plan.get("stall_mark"):
            open(plan["stall_mark"], "w").close()
        time.sleep(float(plan.get("stall_for", 0)))

    if stall_at == 0:
        stall()
    while sent < cut:
        n = min(chunk, cut - sent)
        if stall_at is not None and sent < stall_at <= sent + n:
            n = max(1, stall_at - sent)
        write_all(data[sent:sent + n])
        sent += n
        if stall_at is not None and sent == stall_at:
            stall()
        if rate:
            time.sleep(n / float(rate))
    after = plan.get("after", "exit:0")
    if after == "kill-self":
        os.kill(os.getpid(), signal.SIGKILL)
    if after == "kill-session":
        pid = sshd_session_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        time.sleep(30)
        os._exit(0)
    if after == "hang":
        # Until the client hangs up (sshd then closes our stdin).
        while os.read(0, 65536):
            pass
        os._exit(0)
    os._exit(int(after.split(":", 1)[1]))


def main():
    command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    words = command.split(" ")
    peer = sys.argv[-1] if len(sys.argv) > 1 else ""
    held = command in ("ping", "list-apps") or (len(words) == 2 and words[0] == "app-info" and SLUG.fullmatch(words[1])) \
        or words[:2] == ["with-app-info", "rsync"]
    if held and SLUG.fullmatch(peer):
        hold = os.path.join(DIR, "holds", f"{peer}.{words[0]}")
        try:
            with open(hold) as fh:
                seconds = float(fh.read())
        except (OSError, ValueError):
            seconds = 0
        if seconds:
            open(hold + ".started", "w").close()
            time.sleep(seconds)
        passthrough()
    if len(words) in (2, 3) and words[0] == "stream-app" and SLUG.fullmatch(words[1]) \
            and words[2:] in ([], ["--zstd"]):
        path = os.path.join(DIR, "plans", words[1] + ".json")
        if os.path.exists(path):
            with open(path) as fh:
                serve(json.load(fh), len(words) == 3)
    passthrough()


if __name__ == "__main__":
    main()
