// peerkit web UI. Every action calls the local server, which runs the peerkit
// CLI with --json. The DOM is built with createElement and textContent only:
// a peer name, app name or message is always text, never markup.
"use strict";

(() => {
  const CSRF = document.querySelector('meta[name="csrf-token"]').getAttribute("content");

  // Plain words for the CLI's machine error codes (README: exit codes and error codes).
  const PLAIN = {
    "busy": "Another peerkit command is busy with this app or with the peer list here. Wait for it to finish, then try again.",
    "no-such-peer": "There is no peer of that name (any more). Refresh the list.",
    "peer-unreachable": "The peer could not be reached. Check that it is online and that its SSH server is running.",
    "host-key-mismatch": "The peer's host key is not the one pinned at pairing. Do not trust it until its operator confirms a reinstall; then re-pair.",
    "refused": "The peer refused. Its operator may not have paired our token yet, or does not allow this.",
    "bad-response": "The peer answered something peerkit does not understand.",
    "no-such-app": "The peer does not offer this app (it does not exist there, or we may not see it).",
    "bad-slug": "That app name is not valid.",
    "bad-name": "That peer name is not valid: use 1–63 of a–z, 0–9 and “-”, starting with a letter or digit.",
    "transfer-incomplete": "The transfer did not complete. The local app is unchanged.",
    "unsafe-archive": "The peer sent an unsafe archive, which was refused. The local app is unchanged.",
    "backup-failed": "The pre-backup failed, so nothing was changed.",
    "hook-failed": "A hook failed. If it was after the swap, the previous copy of the app was put back.",
    "failed": "The peer failed while sending the app. The local app is unchanged.",
    "no-space": "There is not enough free disk space for this app. Nothing was changed.",
    "interrupted": "The pull was interrupted. The local app is unchanged or was put back.",
    "not-a-token": "That is not a pairing token. Paste the whole line, starting with lp-peer|.",
    "unsupported-version": "This peerkit does not support that token's version.",
    "fingerprint-mismatch": "The token's fingerprint does not match its key: it was cut short or changed on the way.",
    "bad-field": "A field of the token is malformed: it was changed on the way.",
    "checksum-mismatch": "The token's check value does not match: a character was changed or lost. Copy it again.",
    "bad-token": "The pairing token is invalid.",
    "peer-exists": "A peer of that name is already paired with a different key. Pick another name, or unpair the old one first.",
    "key-in-use": "That key is already authorized here, for another peer or outside peerkit.",
    "self-pairing": "That is this instance's own token. Paste the other instance's token.",
    "not-initialized": "This instance has no configuration yet: run peerkit init.",
    "bad-config": "This instance's configuration is invalid.",
    "bad-state": "The peer database cannot be used.",
    "bad-identity": "This instance's identity key cannot be used.",
    "authorized-keys": "authorized_keys cannot be updated safely.",
    "bad-permission": "That permission or expiry change is not valid.",
    "forbidden": "The server refused this page's request. Open the address peerkit web printed, then reload.",
    "offline": "The peerkit web server does not answer. Is it still running?",
    "usage": "peerkit did not understand the request.",
    "error": "peerkit failed unexpectedly.",
  };

  const STATUS = {
    "ok": ["Online", "good"],
    "new": ["Not contacted yet", "neutral"],
    "unreachable": ["Unreachable", "warn"],
    "refused": ["Refused", "bad"],
    "host-key-mismatch": ["Host key mismatch", "bad"],
  };

  const STAGE_NAMES = {
    "lock": "Lock", "ping": "Connect", "inventory": "Inventory", "backup": "Pre-backup",
    "transfer": "Transfer", "verify": "Verify", "flush": "Write to disk", "stop": "Stop", "swap": "Swap",
    "rewrite": "URL rewrite", "start": "Start", "post_restore": "Post-restore", "cleanup": "Clean-up",
    "rollback": "Rollback",
  };

  const $ = (id) => document.getElementById(id);

  // el("p", {class: "x"}, "text", child): strings become text nodes, never HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child);
    }
    return node;
  }

  // Replace a node's children, skipping the null of an optional part.
  function fill(node, ...children) {
    node.replaceChildren(...children.filter((c) => c !== null && c !== undefined && c !== false));
  }

  async function api(method, path, body) {
    const options = {method, headers: {"Accept": "application/json"}, credentials: "same-origin", cache: "no-store"};
    if (method !== "GET") options.headers["X-CSRF-Token"] = CSRF;
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (e) {
      return {ok: false, error: "offline", message: "no answer from the server"};
    }
    try {
      const data = await response.json();
      if (data && typeof data === "object") return data;
    } catch (e) { /* fall through */ }
    return {ok: false, error: response.status === 403 ? "forbidden" : "error", message: "HTTP " + response.status};
  }

  function plain(code) {
    return PLAIN[code] || "peerkit reported a problem.";
  }

  function errorBox(result, heading) {
    const code = typeof result.error === "string" ? result.error : "error";
    return el("div", {class: "callout callout-bad", role: "alert"},
      el("p", {class: "callout-title", text: heading || plain(code)}),
      heading ? el("p", {text: plain(code)}) : null,
      el("p", {class: "detail"}, el("code", {class: "code", text: code}), " ",
        typeof result.message === "string" ? result.message : ""),
      notesList(result.remarks));
  }

  function notesList(notes) {
    if (!Array.isArray(notes) || notes.length === 0) return null;
    return el("ul", {class: "notes"}, ...notes.filter((n) => typeof n === "string").map((n) => el("li", {text: n})));
  }

  function size(bytes) {
    if (typeof bytes !== "number" || !isFinite(bytes)) return "?";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let n = bytes;
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
  }

  function relative(iso) {
    const t = Date.parse(iso);
    if (isNaN(t)) return null;
    const seconds = Math.round((Date.now() - t) / 1000);
    const abs = Math.abs(seconds);
    if (abs < 45) return seconds >= 0 ? "just now" : "in a moment";
    const steps = [[60, "minute"], [3600, "hour"], [86400, "day"], [604800, "week"], [2629800, "month"], [31557600, "year"]];
    let [unit, name] = steps[0];
    for (const [s, n] of steps) if (abs >= s) { unit = s; name = n; }
    const count = Math.max(1, Math.round(abs / unit));
    const words = `${count} ${name}${count === 1 ? "" : "s"}`;
    return seconds >= 0 ? `${words} ago` : `in ${words}`;
  }

  function absolute(iso) {
    const t = new Date(iso);
    if (isNaN(t.getTime())) return String(iso);
    return t.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "short"});
  }

  function timeNode(iso, never) {
    if (!iso || typeof iso !== "string") return el("span", {class: "muted", text: never});
    const rel = relative(iso);
    if (!rel) return el("span", {text: iso});
    return el("time", {datetime: iso, title: iso}, rel,
      el("span", {class: "muted abs", text: ` · ${absolute(iso)}`}));
  }

  function notice(text, kind) {
    const box = $("notice");
    fill(box, el("span", {text}));
    box.className = `notice notice-${kind || "good"}`;
    box.hidden = false;
    clearTimeout(notice.timer);
    notice.timer = setTimeout(() => { box.hidden = true; }, 8000);
  }

  function describePermissions(perms) {
    const p = perms && typeof perms === "object" ? perms : {};
    const chips = [];
    if (p.apps === "all") chips.push(["All apps", "good"]);
    else if (Array.isArray(p.apps) && p.apps.length) chips.push([`Apps: ${p.apps.join(", ")}`, "neutral"]);
    else chips.push(["No apps", "warn"]);
    if (Array.isArray(p.deny_apps) && p.deny_apps.length) chips.push([`Except ${p.deny_apps.join(", ")}`, "warn"]);
    chips.push(p.push ? ["May push to us", "warn"] : ["No push", "neutral"]);
    if (Array.isArray(p.from) && p.from.length) chips.push([`From ${p.from.join(", ")}`, "neutral"]);
    else chips.push(["From any address", "neutral"]);
    return chips.map(([text, kind]) => el("span", {class: `chip chip-${kind}`, text}));
  }

  function expiryNode(iso) {
    if (!iso) return el("span", {class: "muted", text: "Never"});
    const t = Date.parse(iso);
    const expired = !isNaN(t) && t <= Date.now();
    const rel = relative(iso);
    return el("span", {class: expired ? "text-bad" : ""},
      el("time", {datetime: iso, title: iso}, expired ? `Expired ${rel || ""}` : absolute(iso)),
      !expired && rel ? el("span", {class: "muted", text: ` · ${rel}`}) : null);
  }

  // -- peers ------------------------------------------------------------------

  async function loadPeers() {
    const list = $("peers");
    list.setAttribute("aria-busy", "true");
    const result = await api("GET", "/api/peers");
    list.setAttribute("aria-busy", "false");
    if (!result.ok) {
      fill(list, errorBox(result, "Could not list the peers."));
      $("empty").hidden = true;
      return;
    }
    const peers = Array.isArray(result.peers) ? result.peers : [];
    // Keep open app drawers (and their listing) across a refresh.
    const open = new Map();
    for (const old of list.querySelectorAll("article.card")) {
      const drawer = old.querySelector(".drawer");
      if (!drawer.hidden) open.set(old.dataset.peer, drawer);
    }
    const cards = peers.map(peerCard);
    for (const card of cards) {
      const drawer = open.get(card.dataset.peer);
      if (!drawer) continue;
      card.querySelector(".drawer").replaceWith(drawer);
      const button = card.querySelector(".list-apps");
      button.setAttribute("aria-controls", drawer.id);
      button.setAttribute("aria-expanded", "true");
      button.textContent = "Hide apps";
    }
    fill(list, ...cards);
    $("empty").hidden = peers.length > 0;
    list.hidden = peers.length === 0;
  }

  function peerCard(peer) {
    const card = $("peer-card").content.firstElementChild.cloneNode(true);
    const name = String(peer.name);
    card.dataset.peer = name;
    card.querySelector(".peer-name").textContent = name;
    card.querySelector(".address").textContent = `${peer.user}@${peer.host}:${peer.port}`;
    const [label, kind] = STATUS[peer.status] || [String(peer.status), "neutral"];
    const badges = card.querySelector(".badges");
    badges.append(el("span", {class: `badge badge-${kind}`, "data-status": "", text: label}));
    if (peer.authorized === false) {
      badges.append(el("span", {class: "badge badge-warn", title: "This peer has a record but no line in authorized_keys: it cannot log in here.", text: "Key line missing"}));
    }
    card.querySelector(".last-seen").append(timeNode(peer.last_seen, "Never"));
    card.querySelector(".paired").append(timeNode(peer.created_at, "Unknown"));
    card.querySelector(".expires").append(expiryNode(peer.expires_at));
    card.querySelector(".permissions").append(...describePermissions(peer.permissions));

    const drawer = card.querySelector(".drawer");
    drawer.id = `drawer-${Math.random().toString(36).slice(2)}`;
    const listButton = card.querySelector(".list-apps");
    listButton.setAttribute("aria-controls", drawer.id);
    listButton.addEventListener("click", () => toggleApps(name, listButton, card.querySelector(".drawer")));
    card.querySelector(".ping").addEventListener("click", (e) => ping(name, e.currentTarget));
    card.querySelector(".verify").addEventListener("click", () => openVerify(name));
    card.querySelector(".unpair").addEventListener("click", () => openUnpair(name, card));
    return card;
  }

  async function toggleApps(name, button, drawer) {
    if (!drawer.hidden) {
      drawer.hidden = true;
      button.setAttribute("aria-expanded", "false");
      button.textContent = "List apps";
      return;
    }
    drawer.hidden = false;
    button.setAttribute("aria-expanded", "true");
    button.textContent = "Hide apps";
    fill(drawer, el("p", {class: "busy-line", text: `Asking ${name} for its apps…`}));
    const result = await api("GET", `/api/peers/${encodeURIComponent(name)}/apps`);
    if (!result.ok) {
      fill(drawer, errorBox(result, `Could not list ${name}'s apps.`));
      return;
    }
    const apps = Array.isArray(result.apps) ? result.apps : [];
    const head = el("div", {class: "drawer-head"},
      el("h3", {text: `Apps on ${name}`}),
      el("span", {class: "muted", text: result.domain ? `domain ${result.domain}` : "no domain advertised"}));
    if (apps.length === 0) {
      fill(drawer, head, el("p", {class: "muted", text: `${name} offers no apps to this instance.`}));
      return;
    }
    const rows = apps.map((app) => {
      const slug = String(app.slug);
      const pull = el("button", {type: "button", class: "btn btn-small btn-primary", "aria-label": `Pull ${slug} from ${name}`, text: "Pull"});
      pull.addEventListener("click", () => openPull(name, slug, app.size_kb, result.domain));
      return el("tr", {"data-app": slug},
        el("th", {scope: "row", class: "app-slug", text: slug}),
        el("td", {class: "num", text: size(app.size_kb * 1024)}),
        el("td", {class: "actions-cell"}, pull));
    });
    fill(drawer, head, el("table", {class: "apps"},
      el("thead", {}, el("tr", {}, el("th", {scope: "col", text: "App"}), el("th", {scope: "col", class: "num", text: "Size"}),
        el("th", {scope: "col"}, el("span", {class: "sr-only", text: "Actions"})))),
      el("tbody", {}, ...rows)));
  }

  async function ping(name, button) {
    button.disabled = true;
    button.textContent = "Pinging…";
    const result = await api("POST", `/api/peers/${encodeURIComponent(name)}/ping`);
    button.disabled = false;
    button.textContent = "Ping";
    if (result.ok) notice(`${name} answered in ${result.rtt_ms} ms (peerkit ${result.version}).`, "good");
    else notice(`${name}: ${plain(result.error)} (${result.error})`, "bad");
    await loadPeers();
  }

  // -- dialogs ------------------------------------------------------------------

  function show(dialog, state) {
    for (const part of dialog.querySelectorAll("[data-state]")) part.hidden = part.dataset.state !== state;
  }

  function wireClose(dialog) {
    for (const button of dialog.querySelectorAll(".close")) button.addEventListener("click", () => dialog.close());
  }

  async function openToken() {
    const dialog = $("token-dialog");
    show(dialog, "loading");
    $("token-copy").disabled = true;
    $("copy-state").textContent = "";
    dialog.showModal();
    const result = await api("GET", "/api/token");
    if (!result.ok) {
      fill(dialog.querySelector('[data-state="error"]'), errorBox(result, "Could not read the token."));
      show(dialog, "error");
      return;
    }
    $("token-text").value = result.token;
    $("token-format").textContent = `(format ${result.format}, name ${result.name})`;
    $("token-fingerprint").textContent = result.fingerprint;
    $("token-copy").disabled = false;
    show(dialog, "ready");
    $("token-text").focus();
    $("token-text").select();
  }

  async function copyToken() {
    const text = $("token-text").value;
    let done = false;
    try {
      await navigator.clipboard.writeText(text);
      done = true;
    } catch (e) {
      $("token-text").select();
      done = document.execCommand && document.execCommand("copy");
    }
    $("copy-state").textContent = done ? "Copied." : "Select the text and copy it.";
  }

  function openPair() {
    const dialog = $("pair-dialog");
    $("pair-form").reset();
    show(dialog, "form");
    $("pair-submit").hidden = false;
    $("pair-submit").disabled = false;
    $("pair-cancel").textContent = "Cancel";
    $("pair-cancel").classList.remove("btn-primary");
    dialog.showModal();
    $("pair-token").focus();
  }

  async function submitPair(event) {
    event.preventDefault();
    const dialog = $("pair-dialog");
    const token = $("pair-token").value.trim();
    const name = $("pair-name").value.trim();
    const area = dialog.querySelector('[data-state="result"]');
    if (!token) {
      fill(area, errorBox({error: "not-a-token", message: "the token field is empty"}, "Paste a token first."));
      area.hidden = false;
      $("pair-token").focus();
      return;
    }
    $("pair-submit").disabled = true;
    $("pair-submit").textContent = "Pairing…";
    const result = await api("POST", "/api/pair", {token, name});
    $("pair-submit").textContent = "Pair";
    $("pair-submit").disabled = false;
    if (!result.ok) {
      fill(area, errorBox(result, "Pairing failed."));
      area.hidden = false;
      return;
    }
    const peer = result.peer || {};
    const verb = {added: "Paired with", replaced: "Re-keyed", unchanged: "Already paired with"}[result.outcome] || "Paired with";
    fill(area, el("div", {class: "callout callout-good"},
      el("p", {class: "callout-title", text: `${verb} ${peer.name}`}),
      el("p", {class: "muted", text: `${peer.user}@${peer.host}:${peer.port}`})),
      codeBlock(result.verification_code),
      el("p", {text: `Read this code to ${peer.name}'s operator: their peerkit verify must show the same. ` +
        `For the way back, they pair with your token.`}),
      notesList(result.remarks));
    show(dialog, "result");
    $("pair-submit").hidden = true;
    $("pair-cancel").textContent = "Done";
    $("pair-cancel").classList.add("btn-primary");
    $("pair-cancel").focus();
    await loadPeers();
  }

  function codeBlock(code) {
    const groups = typeof code === "string" ? code.split(" ") : [];
    const block = el("div", {}, el("p", {class: "vcode-label", text: "Verification code"}),
      el("div", {class: "vcode", "aria-label": `Verification code ${code}`, "data-code": code},
        ...groups.map((g) => el("span", {text: g}))));
    return block;
  }

  async function openVerify(name) {
    const dialog = $("verify-dialog");
    $("verify-title").textContent = `Verification code for ${name}`;
    show(dialog, "loading");
    dialog.showModal();
    const result = await api("GET", `/api/peers/${encodeURIComponent(name)}/verify`);
    const area = dialog.querySelector('[data-state="result"]');
    if (!result.ok) {
      fill(area, errorBox(result, "Could not compute the code."));
    } else {
      fill(area, codeBlock(result.verification_code),
        el("p", {text: `Read it aloud with ${name}'s operator: their peerkit verify (or this page) must show the same code. ` +
          "A different code means a swapped token: unpair at once."}),
        el("dl", {class: "kv"},
          el("dt", {text: "Our key"}), el("dd", {}, el("code", {text: result.our_fingerprint})),
          el("dt", {text: `${name}'s key`}), el("dd", {}, el("code", {text: result.peer_fingerprint}))));
    }
    show(dialog, "result");
  }

  let unpairTarget = null;

  function openUnpair(name, card) {
    const dialog = $("unpair-dialog");
    unpairTarget = {name, card};
    $("unpair-title").textContent = `Unpair ${name}?`;
    $("unpair-text").textContent = `${name}'s key line is removed from authorized_keys at once and its record is deleted: ` +
      "it can no longer call peer-shell here, and this page can no longer pull from it. " +
      "Pairing again needs a new token from its operator.";
    $("unpair-confirm").textContent = `Unpair ${name}`;
    $("unpair-confirm").disabled = false;
    show(dialog, "none");
    dialog.showModal();
    $("unpair-cancel").focus();
  }

  async function confirmUnpair() {
    if (!unpairTarget) return;
    const {name, card} = unpairTarget;
    const dialog = $("unpair-dialog");
    $("unpair-confirm").disabled = true;
    const result = await api("DELETE", `/api/peers/${encodeURIComponent(name)}`);
    if (!result.ok) {
      const area = dialog.querySelector('[data-state="result"]');
      fill(area, errorBox(result, `Could not unpair ${name}.`));
      show(dialog, "result");
      $("unpair-confirm").disabled = false;
      return;
    }
    dialog.close();
    card.remove();
    unpairTarget = null;
    notice(`Unpaired ${name}: its key can no longer log in here.`, "good");
    await loadPeers();
  }

  // -- pulls --------------------------------------------------------------------

  let pullTarget = null;

  function openPull(peer, app, sizeKb, domain) {
    const dialog = $("pull-dialog");
    pullTarget = {peer, app};
    $("pull-title").textContent = `Pull ${app} from ${peer}`;
    $("pull-backup").checked = true;
    $("pull-rewrite").checked = true;
    $("pull-backup").disabled = false;
    $("pull-rewrite").disabled = false;
    $("pull-rewrite-hint").textContent = domain
      ? `Replace ${domain} with this instance's domain in .env and compose files.`
      : `Replace ${peer}'s domain with ours in .env and compose files.`;
    $("pull-progress").hidden = true;
    $("pull-result").hidden = true;
    fill($("pull-result"));
    $("pull-start").hidden = false;
    $("pull-start").disabled = false;
    $("pull-cancel").textContent = "Cancel";
    $("pull-cancel").disabled = false;
    delete dialog.dataset.job;
    dialog.dataset.state = "ready";
    dialog.showModal();
    $("pull-start").focus();
  }

  async function startPull() {
    if (!pullTarget) return;
    const {peer, app} = pullTarget;
    const dialog = $("pull-dialog");
    $("pull-start").disabled = true;
    $("pull-backup").disabled = true;
    $("pull-rewrite").disabled = true;
    $("pull-cancel").textContent = "Hide";
    dialog.dataset.state = "running";
    setProgress(null, peer);
    $("pull-progress").hidden = false;
    const job = await api("POST", "/api/pulls", {
      peer, app, pre_backup: $("pull-backup").checked, rewrite_urls: $("pull-rewrite").checked,
    });
    if (!job.ok) {
      finishPull({...job, event: "result"});
      return;
    }
    follow(job.id, peer, app);
  }

  function setProgress(event, peer) {
    const bar = $("pull-bar");
    if (!event || typeof event.total !== "number" || event.total <= 0) {
      bar.removeAttribute("value");
      $("pull-stage").textContent = event ? "Transferring…" : `Connecting to ${peer} and checking the app…`;
      $("pull-bytes").textContent = event ? size(event.bytes) : "";
      return;
    }
    const fraction = Math.min(event.bytes / event.total, 1);
    bar.max = 1;
    bar.value = fraction;
    const done = event.bytes >= event.total;
    $("pull-stage").textContent = done ? "Transferred; verifying, swapping and starting…" : "Transferring…";
    $("pull-bytes").textContent = `${size(event.bytes)} of ${size(event.total)} · ${Math.round(fraction * 100)}%`;
  }

  function follow(id, peer, app) {
    const dialog = $("pull-dialog");
    dialog.dataset.job = id;
    dialog.dataset.progressEvents = "0";
    const mine = () => dialog.dataset.job === id;
    let finished = false;
    const done = (result) => {
      finished = true;
      if (mine()) finishPull(result);
      // The dialog was hidden or reused meanwhile: say how it ended.
      if (!mine() || !dialog.open) {
        notice(result.ok ? `Pulled ${app} from ${peer}.` : `The pull of ${app} from ${peer} failed: ${plain(result.error)}`,
          result.ok ? "good" : "bad");
      }
    };
    const source = new EventSource(`/api/pulls/${encodeURIComponent(id)}/events`);
    source.addEventListener("progress", (e) => {
      if (!mine()) return;
      dialog.dataset.progressEvents = String(Number(dialog.dataset.progressEvents) + 1);
      setProgress(JSON.parse(e.data));
    });
    source.addEventListener("result", (e) => {
      source.close();
      done(JSON.parse(e.data));
    });
    source.addEventListener("error", () => {
      if (finished) return;
      source.close();
      poll(id, done);
    });
  }

  async function poll(id, done) {
    // Fallback when the event stream breaks: ask for the job's state.
    for (;;) {
      const state = await api("GET", `/api/pulls/${encodeURIComponent(id)}`);
      if (!state.ok) { done({...state, event: "result"}); return; }
      if (state.progress && pullShown(id)) setProgress(state.progress);
      if (state.result) { done(state.result); return; }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  function pullShown(id) {
    return $("pull-dialog").dataset.job === id;
  }

  function stageList(stages) {
    if (!Array.isArray(stages) || stages.length === 0) return null;
    return el("ol", {class: "stages"}, ...stages.map((s) => {
      const outcome = String(s.outcome);
      const kind = outcome === "ok" ? "good" : outcome === "failed" ? "bad" : "neutral";
      return el("li", {class: `stage-${kind}`, title: s.detail ? `${outcome}: ${s.detail}` : outcome},
        el("span", {class: "stage-name", text: STAGE_NAMES[s.name] || String(s.name)}),
        el("span", {class: "stage-outcome", text: outcome === "ok" ? "" : ` ${outcome}`}));
    }));
  }

  function backupWords(result) {
    if (result.backup) return el("code", {text: result.backup});
    const stage = (result.stages || []).find((s) => s.name === "backup");
    if (stage && stage.detail === "--no-pre-backup") return "None: turned off for this pull";
    if (stage && stage.detail) return `None: ${stage.detail}`;
    return "None";
  }

  function finishPull(result) {
    const dialog = $("pull-dialog");
    dialog.dataset.state = result.ok ? "done" : "failed";
    const area = $("pull-result");
    const {peer, app} = pullTarget || {peer: result.peer, app: result.app};
    if (result.ok) {
      $("pull-stage").textContent = "Done";
      $("pull-bar").max = 1;
      $("pull-bar").value = 1;
      const rewritten = Array.isArray(result.rewritten) ? result.rewritten : [];
      const rewriteStage = (result.stages || []).find((s) => s.name === "rewrite");
      const urls = rewritten.length ? `Rewritten in ${rewritten.join(", ")}`
        : rewriteStage && rewriteStage.outcome === "skipped" ? "Kept as they were (rewrite turned off)"
          : "Nothing to rewrite";
      fill(area, el("div", {class: "callout callout-good", role: "status"},
        el("p", {class: "callout-title", text: `Pulled ${app} from ${peer}`}),
        el("p", {text: `${result.files} files, ${size(result.bytes)}. The previous copy was replaced in one atomic swap.`})),
        el("dl", {class: "kv"},
          el("dt", {text: "Pre-backup"}), el("dd", {}, backupWords(result)),
          el("dt", {text: "URLs"}), el("dd", {text: urls}),
          el("dt", {text: "Stages"}), el("dd", {}, stageList(result.stages))),
        notesList(result.notes));
    } else {
      const seen = Number(dialog.dataset.progressEvents || 0) > 0;
      $("pull-stage").textContent = "Failed";
      $("pull-progress").hidden = !seen;
      if (!$("pull-bar").hasAttribute("value")) $("pull-bar").value = 0;
      const failed = (result.stages || []).find((s) => s.outcome === "failed");
      fill(area, errorBox(result, failed
        ? `The pull of ${app} failed at the ${STAGE_NAMES[failed.name] || failed.name} stage.`
        : `The pull of ${app} failed.`),
        result.stages ? el("dl", {class: "kv"}, el("dt", {text: "Stages"}), el("dd", {}, stageList(result.stages))) : null);
    }
    area.hidden = false;
    $("pull-start").hidden = true;
    $("pull-cancel").textContent = "Close";
    loadPeers();
  }

  // -- start ---------------------------------------------------------------------

  async function start() {
    for (const dialog of document.querySelectorAll("dialog")) wireClose(dialog);
    $("show-token").addEventListener("click", openToken);
    $("token-copy").addEventListener("click", copyToken);
    $("pair-open").addEventListener("click", openPair);
    $("empty-pair").addEventListener("click", openPair);
    $("pair-form").addEventListener("submit", submitPair);
    $("unpair-confirm").addEventListener("click", confirmUnpair);
    $("pull-start").addEventListener("click", startPull);
    $("refresh").addEventListener("click", loadPeers);
    const session = await api("GET", "/api/session");
    if (session.ok) {
      $("instance").textContent = session.instance;
      document.title = `Peers · ${session.instance} · peerkit`;
      $("version").textContent = `peerkit ${session.version}`;
    }
    await loadPeers();
    document.body.dataset.ready = "true";
  }

  start();
})();
