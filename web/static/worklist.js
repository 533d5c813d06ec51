// Refreshes the worklist's rows every 10 s (the same query, rendered by /worklist/rows), so
// arriving studies and AI state changes show without a reload. Keyboard focus is kept.
(function () {
  "use strict";
  const table = document.querySelector("table.worklist");
  const rows = document.getElementById("worklist-rows");
  const status = document.getElementById("refresh-status");
  if (!table || !rows) return;
  const url = table.dataset.rowsUrl;
  async function refresh() {
    if (document.hidden || rows.contains(document.activeElement)) return;
    try {
      const response = await fetch(url, { headers: { Accept: "text/html" } });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const html = await response.text();
      if (html.trim() !== rows.innerHTML.trim()) rows.innerHTML = html;
      status.textContent = "Updated " + new Date().toLocaleTimeString() + "; refreshes every 10 seconds.";
    } catch (error) {
      status.textContent = "Could not refresh the list (" + error.message + "); retrying.";
    }
  }
  window.hilumRefreshWorklist = refresh;
  setInterval(refresh, 10000);
})();
