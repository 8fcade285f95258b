// Live parts of a page: an element with data-live="/some/stream" takes each server-sent
// event as its new content. No framework, no build step: the server renders everything.
"use strict";

const indicator = () => document.getElementById("live");

function follow(element) {
  const source = new EventSource(element.dataset.live);
  source.onmessage = (event) => {
    element.innerHTML = event.data;
    element.dataset.updated = String(Date.now());
    // A saga that has ended offers no actions any more.
    if (element.querySelector("[data-finished=true]")) {
      document.querySelectorAll("[data-while-running]").forEach((form) => { form.hidden = true; });
    }
    const live = indicator();
    if (live) { live.className = "live"; live.textContent = "live"; }
  };
  source.onerror = () => {
    // EventSource reconnects by itself; say so meanwhile.
    const live = indicator();
    if (live) { live.className = "live off"; live.textContent = "reconnecting"; }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(follow);
  if (!document.querySelector("[data-live]")) {
    const live = indicator();
    if (live) live.hidden = true;
  }
});
