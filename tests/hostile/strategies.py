"""Hypothesis strategies for SSH_ORIGINAL_COMMAND values: allowed forms, near misses and noise.

Generation has to be cheap (100,000 commands per run), and hypothesis pays
tens of microseconds for every elementary draw.  So the structured
strategies draw one byte string each and *decode* it into a command with a
small deterministic chooser (the technique of structure-aware fuzzers):
hypothesis still explores, replays and shrinks the bytes, and a shrunk
(all-zero, short) byte string decodes to the simplest command, because every
choice lists its simplest option first.
"""

from __future__ import annotations

import string

from hypothesis import strategies as st

LOWER_DIGITS = string.ascii_lowercase + string.digits
ALNUM = string.ascii_letters + string.digits
B64 = ALNUM + "+/"
# Characters that have fooled parsers, shells, terminals or normalisers.
SPECIAL = list(" \t\n\r\x00\x0b\x0c\x1b\x7f;|&`$()<>*?~{}[]\\'\"#!%=,:/.-_^@+") + [
    "\x85", "\xa0", "\xad", "\u200b", "\u200d", "\u2010", "\u2011", "\u2212", "\u2024", "\u2025", "\u2028",
    "\u202e", "\u3000", "\ufeff", "\uff0e", "\uff0f", "\uff50", "\u0456", "\u0430", "\u0301", "\udc80", "\udcff",
    "\U0001f600", "\u212a", "\u0130", "\ufb01",
]
CHARS = SPECIAL + list(string.printable)
SLUGS = ["shared", "a", "secret", "nope", "0", "a-", "z" * 63]
VOCAB = [
    "ping", "list-apps", "app-info", "stream-app", "receive-app", "replace-key", "rsync", "with-app-info", "Ping",
    "list_apps",
    "stream-apps", "sh", "bash", "-c", "scp", "sftp", "internal-sftp", "/bin/sh", "exec", "env", "git-upload-pack",
    "--zstd", "--keep-urls", "--no-pre-backup", "--domain", "--server", "--sender", "--delete", "--stats",
    "--numeric-ids", "--", "-", "-x", "-e", "--rsh=sh", "--rsync-path=sh", "--to-command=sh",
    "--checkpoint-action=exec=sh", "--log-file=/tmp/x", "--files-from=/etc/passwd", "--link-dest=/",
    "-lHogtpre.iLsfxC", "-Le.x", "-De.x", "-se.x", ".", "..", "../", "/", "/etc/passwd", "~", "$(id)", "`id`",
    ";", "|", "&&", ">", "shared/", "../shared/", "shared/..", "example.org", "1.2.3.4", "::1",
]
SEPARATORS = [" "] * 12 + ["  ", "\t", "", "\n", " \n", "\r\n", "\x00", "\u00a0"]


class Chooser:
    """Turn a byte string into choices; past its end every choice is the first (simplest) one."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0

    def byte(self) -> int:
        if self.i >= len(self.data):
            return 0
        self.i += 1
        return self.data[self.i - 1]

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        if n <= 256:
            return self.byte() % n
        return ((self.byte() << 8) | self.byte()) % n

    def between(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, per256: int) -> bool:
        return self.byte() >= 256 - per256

    def text(self, alphabet: str, lo: int, hi: int) -> str:
        return "".join(self.choice(alphabet) for _ in range(self.between(lo, hi)))

    def char(self) -> str:
        if self.chance(32):  # any code point of the BMP, surrogates included
            return chr((self.byte() << 8) | self.byte())
        return self.choice(CHARS)

    # -- grammar pieces -------------------------------------------------------------

    def slug(self) -> str:
        if self.chance(96):
            return self.choice(LOWER_DIGITS) + self.text(LOWER_DIGITS + "-", 0, 20)
        return self.choice(SLUGS)

    def label(self) -> str:
        mid = self.text(ALNUM + "-", 0, 8)
        return self.choice(ALNUM) + (mid + self.choice(ALNUM) if mid or self.chance(128) else "")

    def domain(self) -> str:
        return ".".join(self.label() for _ in range(self.between(2, 4)))

    def allowed(self) -> str:
        kind = self.below(10)
        if kind == 0:
            return "ping"
        if kind == 1:
            return "list-apps"
        if kind == 2:
            return f"stream-app {self.slug()}" + (" --zstd" if self.chance(128) else "")
        if kind in (3, 4):
            words = ["receive-app", self.slug()]
            flags = ["--zstd", "--keep-urls", "--no-pre-backup", "--domain"]
            for _ in range(self.below(5)):
                flag = flags.pop(self.below(len(flags)))
                words += [flag, self.domain()] if flag == "--domain" else [flag]
            return " ".join(words)
        if kind == 5:
            return "replace-key " + self.text(B64, 68, 68)
        if kind == 8:
            return f"app-info {self.slug()}"
        sender = kind in (6, 9)
        pool = ["--numeric-ids"] if sender else ["--delete", "--stats", "--numeric-ids"]
        options = [pool.pop(self.below(len(pool))) for _ in range(self.below(len(pool) + 1))]
        flags = f"-{self.text('lHogtpr', 1, 9)}e.{self.text(string.ascii_letters, 1, 12)}"
        head = (["with-app-info"] if kind == 9 else []) + ["rsync", "--server"] + (["--sender"] if sender else [])
        return " ".join(head + [flags, *options, ".", self.slug() + "/"])

    def mutated(self) -> str:
        text = self.allowed()
        for _ in range(self.between(1, 3)):
            kind = self.below(9)
            words = text.split(" ")
            i = self.below(len(text) + 1)
            w = self.below(len(words))
            if kind == 0:
                text = text[:i] + self.char() + text[i:]
            elif kind == 1:
                text = text[:i] + self.char() + text[i + 1:]
            elif kind == 2:
                text = text[:i] + text[i + 1:]
            elif kind == 3:
                text = " ".join(words[:w + 1] + words[w:])
            elif kind == 4 and len(words) > 1:
                text = " ".join(words[:w] + words[w + 1:])
            elif kind == 5 and len(words) > 1:
                j = min(w, len(words) - 2)
                words[j], words[j + 1] = words[j + 1], words[j]
                text = " ".join(words)
            elif kind == 6:
                text = " ".join(words[:w] + [self.word()] + words[w:])
            elif kind == 7:
                text = text[:i] + text[i:i + 1].upper() + text[i + 1:]
            else:
                text = text[:i] + self.choice(SEPARATORS[11:]) + text[i:]
        return text

    def word(self) -> str:
        kind = self.below(8)
        if kind < 4:
            return self.choice(VOCAB)
        if kind == 4:
            return self.slug()
        if kind == 5:
            return self.domain()
        if kind == 6:
            return self.text(string.printable, 0, 12)
        return "".join(self.char() for _ in range(self.between(1, 6)))

    def words(self) -> str:
        out = self.word()
        for _ in range(self.below(8)):
            out += self.choice(SEPARATORS) + self.word()
        return out

    def near_the_limit(self) -> str:
        """Allowed shapes of 250-262 characters: the 256-character bound from both sides."""
        target = self.between(250, 262)
        if self.chance(48):
            return "rsync --server -" + "r" * (target - 24) + "e.x . " + "a" * 16 + "/"
        head = "receive-app " + self.slug() + self.choice(["", " --zstd", " --keep-urls --zstd"]) + " --domain "
        room = max(3, target - len(head))
        labels = []
        while room > 0:
            n = min(room, self.between(1, 63))
            if room - n == 1:  # a label cannot end the name with a lone dot after it
                n = max(1, n - 1)
            labels.append(self.choice(string.ascii_lowercase) * n)
            room -= n + 1
        if len(labels) == 1:
            labels.append("x")
        return head + ".".join(labels)


def _decoded(method: str, max_size: int) -> st.SearchStrategy[str]:
    return st.binary(max_size=max_size).map(lambda data: getattr(Chooser(data), method)())


allowed_commands = _decoded("allowed", 120)
mutated_commands = _decoded("mutated", 160)
word_sequences = _decoded("words", 160)
near_the_limit = _decoded("near_the_limit", 80)
# Arbitrary text, drawn character by character by hypothesis itself.
raw_text = st.text(st.one_of(st.sampled_from(SPECIAL), st.characters(max_codepoint=0x7f), st.characters()),
                   max_size=120)


def batches(method: str, size: int) -> st.SearchStrategy[list[str]]:
    """``size`` commands decoded from one byte string (one hypothesis draw per batch)."""
    def decode(data: bytes) -> list[str]:
        chooser = Chooser(data)
        return [getattr(chooser, method)() for _ in range(size)]
    return st.binary(min_size=size * 32, max_size=size * 48).map(decode)
