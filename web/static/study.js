// Remembers the reviewer's name in this browser, so that each finding's form is prefilled.
(function () {
  "use strict";
  const key = "hilum.reviewer";
  const saved = localStorage.getItem(key) || "";
  for (const input of document.querySelectorAll("input.reviewer")) {
    if (!input.value) input.value = saved;
    input.addEventListener("change", () => localStorage.setItem(key, input.value.trim()));
  }
})();
