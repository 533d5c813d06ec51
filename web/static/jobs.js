// The jobs page: lists GET /api/jobs (newest first, filtered by state, model and study), pages
// back with ?before=<id>, and re-runs a done or failed job with POST /api/jobs/{id}/rerun.
(function () {
  "use strict";
  const rows = document.getElementById("job-rows");
  const status = document.getElementById("jobs-status");
  const more = document.getElementById("more-jobs");
  const form = document.getElementById("job-filters");
  const PAGE = 50;
  let oldest = null;

  function filters() {
    const params = new URLSearchParams();
    for (const name of ["state", "model", "study"]) {
      const value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    return params;
  }
  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text == null ? "" : String(text);
    if (className) td.className = className;
    return td;
  }
  function when(iso) { return iso ? iso.replace("T", " ").slice(0, 16) + " UTC" : ""; }

  function render(job) {
    const row = document.createElement("tr");
    row.dataset.job = job.id;
    row.dataset.state = job.state;
    cell(row, job.id);
    const state = row.insertCell().appendChild(document.createElement("span"));
    state.textContent = job.state;
    state.className = "state state-" + job.state;
    cell(row, job.priority > 0 ? "STAT (" + job.priority + ")" : "routine");
    cell(row, job.model.name + " " + job.model.version);
    const study = row.insertCell();
    const link = document.createElement("a");
    link.href = document.body.dataset.root + "/studies/" + encodeURIComponent(job.StudyInstanceUID);
    link.textContent = job.StudyInstanceUID;
    link.className = "uid";
    study.appendChild(link);
    cell(row, job.attempts);
    cell(row, when(job.queued_at));
    cell(row, when(job.finished_at));
    cell(row, job.reason);
    const action = row.insertCell();
    if (job.state === "done" || job.state === "failed") {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Re-run";
      button.setAttribute("aria-label", "Re-run job " + job.id);
      button.addEventListener("click", () => rerun(job.id, button));
      action.appendChild(button);
    }
    return row;
  }

  async function load(append) {
    const params = filters();
    params.set("limit", PAGE);
    // Queued jobs in the order workers take them (STAT first, then oldest); others newest first.
    const queueOrder = params.get("state") === "queued";
    if (queueOrder) params.set("order", "queue");
    if (append && oldest !== null) params.set("before", oldest);
    status.textContent = "Loading…";
    try {
      const response = await fetch(document.body.dataset.root + "/api/jobs?" + params, { headers: { Accept: "application/json" } });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
      if (!append) rows.replaceChildren();
      for (const job of body) rows.appendChild(render(job));
      if (body.length) oldest = body[body.length - 1].id;
      more.hidden = queueOrder || body.length < PAGE;
      const order = queueOrder ? "in the order they will run (STAT first)" : "newest first";
      status.textContent = rows.rows.length ? rows.rows.length + " job(s) shown, " + order + "." : "No job matches.";
    } catch (error) {
      status.textContent = "Could not load the jobs: " + error.message;
    }
  }

  async function rerun(id, button) {
    button.disabled = true;
    try {
      const response = await fetch(document.body.dataset.root + "/api/jobs/" + id + "/rerun", {
        method: "POST",
        // The session's CSRF token (in the page's <meta>), required once logins are on.
        headers: { "X-CSRF-Token": document.querySelector('meta[name="csrf-token"]')?.content || "" },
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
      status.textContent = "Job " + id + " queued again.";
      rows.querySelector('tr[data-job="' + id + '"]').replaceWith(render(body));
    } catch (error) {
      status.textContent = "Job " + id + " not re-run: " + error.message;
      button.disabled = false;
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    history.replaceState(null, "", document.body.dataset.root + "/jobs?" + filters());
    oldest = null;
    load(false);
  });
  more.addEventListener("click", () => load(true));
  load(false);
})();
