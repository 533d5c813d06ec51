// The DICOM access page: partitions, AE permissions and C-MOVE destinations through
// /api/admin (GET to list, POST / PUT to add or replace, DELETE to remove).
(function () {
  "use strict";
  const API = "/api/admin";
  const status = document.getElementById("access-status");

  function say(text, ok) {
    status.textContent = text;
    status.className = "message " + (ok ? "ok" : "error");
    status.hidden = false;
  }
  async function call(method, path, body) {
    const options = { method, headers: { Accept: "application/json" } };
    // The session's CSRF token (in the page's <meta>), required once logins are on.
    const csrf = document.querySelector('meta[name="csrf-token"]');
    if (csrf) options.headers["X-CSRF-Token"] = csrf.content;
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(API + path, options);
    const answer = response.status === 204 ? null : await response.json();
    if (!response.ok) throw new Error((answer && answer.error) || "HTTP " + response.status);
    return answer;
  }
  function list(text) {
    return text.split(",").map((s) => s.trim()).filter((s) => s);
  }
  function cell(row, text) {
    row.insertCell().textContent = text == null ? "" : String(text);
  }
  function removeButton(row, label, action) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "secondary";
    button.textContent = "Remove";
    button.setAttribute("aria-label", label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await action();
        say(label.replace("Remove", "Removed") + ".", true);
        await load();
      } catch (error) {
        say(label + " failed: " + error.message, false);
        button.disabled = false;
      }
    });
    row.insertCell().appendChild(button);
  }

  async function load() {
    try {
      const [partitions, permissions, peers, origins] = await Promise.all([
        call("GET", "/partitions"), call("GET", "/ae-permissions"), call("GET", "/peers"),
        call("GET", "/cors-origins"),
      ]);
      const pRows = document.getElementById("partition-rows");
      pRows.replaceChildren();
      const select = document.getElementById("a-partition");
      const chosen = select.value;
      select.replaceChildren();
      for (const p of partitions) {
        const row = pRows.insertRow();
        cell(row, p.name);
        cell(row, p.ae_titles.join(", ") || "—");
        select.add(new Option(p.name, p.name, false, p.name === (chosen || "default")));
      }
      const aRows = document.getElementById("permission-rows");
      aRows.replaceChildren();
      for (const a of permissions) {
        const row = aRows.insertRow();
        cell(row, a.calling_ae_title);
        cell(row, a.partition);
        cell(row, a.store ? "yes" : "no");
        cell(row, a.query ? "yes" : "no");
        cell(row, a.retrieve ? "yes" : "no");
        cell(row, a.networks.join(", ") || "any address");
        removeButton(row, "Remove " + a.calling_ae_title + " in " + a.partition, () =>
          call("DELETE", "/ae-permissions/" + encodeURIComponent(a.calling_ae_title) +
               "?partition=" + encodeURIComponent(a.partition)));
      }
      document.getElementById("permissions-mode").textContent = permissions.length
        ? "Only the calling AE titles listed here may associate, each in its partition."
        : "None stored: any calling AE title may associate while Hilum listens on loopback " +
          "only, or accept_any_calling_ae is set.";
      const dRows = document.getElementById("peer-rows");
      dRows.replaceChildren();
      for (const d of peers) {
        const row = dRows.insertRow();
        cell(row, d.ae_title);
        cell(row, d.host);
        cell(row, d.port);
        cell(row, d.tls ? "yes" : "no");
        removeButton(row, "Remove destination " + d.ae_title, () =>
          call("DELETE", "/peers/" + encodeURIComponent(d.ae_title)));
      }
      const oRows = document.getElementById("origin-rows");
      oRows.replaceChildren();
      for (const origin of origins) {
        const row = oRows.insertRow();
        cell(row, origin);
        removeButton(row, "Remove origin " + origin, () =>
          call("DELETE", "/cors-origins?origin=" + encodeURIComponent(origin)));
      }
    } catch (error) {
      say("Could not load: " + error.message, false);
    }
  }

  function onSubmit(id, submit) {
    const form = document.getElementById(id);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        say(await submit(form.elements), true);
        form.reset();
        await load();
      } catch (error) {
        say(error.message, false);
      }
    });
  }
  onSubmit("partition-form", async (f) => {
    const p = await call("POST", "/partitions",
                         { name: f.name.value.trim(), ae_titles: list(f.ae_titles.value) });
    return "Partition " + p.name + " created.";
  });
  onSubmit("permission-form", async (f) => {
    const title = f.title.value.trim();
    const a = await call("PUT", "/ae-permissions/" + encodeURIComponent(title) + "/" +
                         encodeURIComponent(f.partition.value), {
      store: f.store.checked, query: f.query.checked, retrieve: f.retrieve.checked,
      networks: list(f.networks.value),
    });
    return "Permission of " + a.calling_ae_title + " in " + a.partition + " saved.";
  });
  onSubmit("peer-form", async (f) => {
    const title = f.title.value.trim();
    const d = await call("PUT", "/peers/" + encodeURIComponent(title), {
      host: f.host.value.trim(), port: Number(f.port.value), tls: f.tls.checked,
    });
    return "Destination " + d.ae_title + " saved.";
  });
  onSubmit("origin-form", async (f) => {
    const o = await call("POST", "/cors-origins", { origin: f.origin.value.trim() });
    return "Origin " + o.origin + " listed.";
  });
  load();
})();
