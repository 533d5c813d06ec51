// The upload page: files and folders (dropped or chosen) sent to /dicomweb/studies with STOW-RS
// (PS3.18 10.5) in batches, with each file's progress and outcome from the STOW-RS response.
(function () {
  "use strict";
  const BATCH_FILES = 16, BATCH_BYTES = 32 << 20;
  const drop = document.getElementById("drop");
  const rows = document.getElementById("upload-rows");
  const summary = document.getElementById("upload-summary");
  // PS3.18 Table 10.5.3-2 / PS3.4 Table B.2-1: Failure Reason (0008,1197) and Warning Reason.
  const REASONS = {
    0x0110: "processing failure",
    0xA700: "out of resources: Hilum's index or blob store is unavailable; try again later",
    0xA900: "the data set does not match its SOP class",
    0xC000: "cannot understand: not a valid DICOM Part 10 file, or its UIDs are missing or invalid",
    0xC409: "the instance belongs to another study than the one addressed",
    0xB006: "already stored with other content; the stored copy was kept",
  };
  const counts = { stored: 0, duplicate: 0, refused: 0 };
  const queue = [];
  let sending = false;

  function show(entry, outcome, text) {
    entry.status.textContent = text;
    entry.status.className = "outcome-" + outcome;
    entry.row.dataset.outcome = outcome;
    if (outcome in counts) counts[outcome] += 1;
  }
  function add(file, path) {
    const row = rows.insertRow();
    row.insertCell().textContent = path || file.name;
    row.insertCell().textContent = (file.size / 1024).toFixed(0) + " KiB";
    const status = row.insertCell();
    status.textContent = "waiting";
    queue.push({ file, row, status, uid: null });
  }

  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      add(file, prefix + file.name);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child, prefix + entry.name + "/");
      }
    }
  }

  // PS3.10 7.1: the File Meta Information is explicit VR little endian; (0002,0003) is the
  // Media Storage SOP Instance UID, which names the file's part in the STOW-RS response.
  async function sopInstanceUid(file) {
    const bytes = new Uint8Array(await file.slice(0, 65536).arrayBuffer());
    const view = new DataView(bytes.buffer);
    let at = 0;
    if (bytes.length >= 132 && String.fromCharCode(...bytes.slice(128, 132)) === "DICM") at = 132;
    const long = new Set(["OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV", "SV", "UV"]);
    while (at + 8 <= bytes.length && view.getUint16(at, true) === 0x0002) {
      const element = view.getUint16(at + 2, true);
      const vr = String.fromCharCode(bytes[at + 4], bytes[at + 5]);
      let length, start;
      if (long.has(vr)) { length = view.getUint32(at + 8, true); start = at + 12; }
      else { length = view.getUint16(at + 6, true); start = at + 8; }
      if (element === 0x0003) {
        return new TextDecoder().decode(bytes.slice(start, start + length)).replace(/[\0 ]+$/, "");
      }
      at = start + length;
    }
    return null;
  }

  function post(batch, boundary, body) {
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", document.body.dataset.root + "/dicomweb/studies");
      const csrf = document.querySelector('meta[name="csrf-token"]');
      if (csrf) xhr.setRequestHeader("X-CSRF-Token", csrf.content);  // required once logins are on
      xhr.setRequestHeader("Content-Type", 'multipart/related; type="application/dicom"; boundary=' + boundary);
      xhr.setRequestHeader("Accept", "application/dicom+json");
      xhr.upload.onprogress = (event) => {
        for (const entry of batch) {
          const done = Math.max(0, Math.min(1, (event.loaded - entry.offset) / entry.file.size));
          entry.status.textContent = "sending " + Math.round(done * 100) + "%";
        }
      };
      xhr.onload = () => resolve({ status: xhr.status, text: xhr.responseText });
      xhr.onerror = () => resolve({ status: 0, text: "" });
      xhr.send(body);
    });
  }

  function settle(batch, response) {
    let body = null;
    try { body = JSON.parse(response.text); } catch (error) { body = null; }
    const referenced = (body && body["00081199"] && body["00081199"].Value) || [];
    const failed = (body && body["00081198"] && body["00081198"].Value) || [];
    const byUid = new Map(batch.filter((e) => e.uid).map((e) => [e.uid, e]));
    const settled = new Set();
    const uidOf = (item) => (item["00081155"] && item["00081155"].Value && item["00081155"].Value[0]) || "";
    for (const item of referenced) {
      const entry = byUid.get(uidOf(item));
      if (!entry || settled.has(entry)) continue;
      settled.add(entry);
      const warning = item["00081196"] && item["00081196"].Value[0];
      if (warning) show(entry, "duplicate", "duplicate: " + (REASONS[warning] || "warning 0x" + warning.toString(16)));
      else show(entry, "stored", "stored");
    }
    const anonymous = [];
    for (const item of failed) {
      const reason = item["00081197"] && item["00081197"].Value[0];
      const text = "refused: " + (REASONS[reason] || "failure reason 0x" + (reason || 0).toString(16));
      const entry = byUid.get(uidOf(item));
      if (entry && !settled.has(entry)) { settled.add(entry); show(entry, "refused", text); }
      else anonymous.push(text);
    }
    // A part Hilum could not parse has no UID in the response: the files left, in order.
    for (const entry of batch) {
      if (settled.has(entry)) continue;
      if (anonymous.length) show(entry, "refused", anonymous.shift());
      else if (response.status === 0) show(entry, "refused", "not sent: Hilum is not reachable");
      else show(entry, "refused", "refused: " + ((body && body.error) || "HTTP " + response.status));
    }
  }

  async function send() {
    if (sending) return;
    sending = true;
    while (queue.length) {
      const batch = [];
      let bytes = 0;
      while (queue.length && batch.length < BATCH_FILES && (bytes < BATCH_BYTES || !batch.length)) {
        const entry = queue.shift();
        bytes += entry.file.size;
        batch.push(entry);
      }
      const boundary = "hilum-" + Math.random().toString(16).slice(2) + Date.now().toString(16);
      const parts = [];
      let offset = 0;
      for (const entry of batch) {
        entry.uid = await sopInstanceUid(entry.file);
        const head = "--" + boundary + "\r\nContent-Type: application/dicom\r\n\r\n";
        offset += head.length;
        entry.offset = offset;
        parts.push(head, entry.file, "\r\n");
        offset += entry.file.size + 2;
        entry.status.textContent = "sending";
      }
      parts.push("--" + boundary + "--\r\n");
      settle(batch, await post(batch, boundary, new Blob(parts)));
      summary.textContent = counts.stored + " stored, " + counts.duplicate + " duplicate, " +
        counts.refused + " refused" + (queue.length ? "; " + queue.length + " waiting" : ".");
    }
    sending = false;
  }

  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const entries = [...event.dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
    if (entries.every(Boolean)) { for (const entry of entries) await walk(entry, ""); }
    else { for (const file of event.dataTransfer.files) add(file, file.name); }
    send();
  });
  for (const id of ["pick-files", "pick-folder"]) {
    document.getElementById(id).addEventListener("change", (event) => {
      for (const file of event.target.files) add(file, file.webkitRelativePath || file.name);
      event.target.value = "";
      send();
    });
  }
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); document.getElementById("pick-files").click(); }
  });
})();
