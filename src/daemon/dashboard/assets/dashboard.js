// dotmac-gitops dashboard: the only script. It refreshes the live part of the page every
// few seconds without reloading it (fetching the same page and swapping #live), and applies
// a filter form as you type. Without it the pages still work: the forms have a button and
// a reload shows the latest state. It sends nothing but GET requests to this daemon.
"use strict";
(() => {
  const live = document.getElementById("live");
  if (!live) return;
  const every = (Number(live.dataset.refresh) || 0) * 1000;
  const toggle = document.getElementById("autorefresh");
  const stamp = document.getElementById("updated");
  const form = document.getElementById("filter");
  let url = location.pathname + location.search;
  let seq = 0;
  let timer = null;

  async function load(target) {
    const mine = ++seq;
    try {
      const r = await fetch(target, { headers: { "X-Dotmac-Refresh": "1" }, cache: "no-store", credentials: "same-origin" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      const fresh = doc.getElementById("live");
      if (!fresh) throw new Error("unexpected answer");
      if (mine !== seq) return; // a newer request (a filter typed meanwhile) wins
      live.replaceChildren(...Array.from(fresh.childNodes, (n) => document.importNode(n, true)));
      document.title = doc.title;
      stamp.textContent = "updated " + new Date().toLocaleTimeString();
      stamp.classList.remove("stale");
    } catch (e) {
      if (mine !== seq) return;
      stamp.textContent = "not updated (" + e.message + ")";
      stamp.classList.add("stale");
    }
  }

  function schedule() {
    clearTimeout(timer);
    if (every > 0) timer = setTimeout(tick, every);
  }

  async function tick() {
    if (toggle.checked && !document.hidden) await load(url);
    schedule();
  }

  if (form) {
    const apply = () => {
      const params = new URLSearchParams();
      // Empty fields and defaults are left out: the address stays the one a link gives.
      for (const e of form.elements) {
        if (!e.name || e.value === "" || e.value === e.dataset.default) continue;
        params.append(e.name, e.value);
      }
      const qs = params.toString();
      url = form.getAttribute("action") + (qs ? "?" + qs : "");
      history.replaceState(null, "", url);
      load(url);
      schedule();
    };
    let debounce = null;
    form.addEventListener("input", () => {
      clearTimeout(debounce);
      debounce = setTimeout(apply, 250);
    });
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      clearTimeout(debounce);
      apply();
    });
  }
  toggle.addEventListener("change", () => { if (toggle.checked) tick(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden && toggle.checked) tick(); });
  stamp.textContent = "updated " + new Date().toLocaleTimeString();
  toggle.closest(".refresh").hidden = false;
  schedule();
})();
