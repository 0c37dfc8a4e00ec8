// Live refresh for the dashboard: every few seconds, fetch this page again
// and swap in its <main>, so the numbers move without a reload. The page is
// whole without this file (the server renders everything; a <noscript>
// refresh reloads it), and it loads nothing from anywhere but this server.
(function () {
  "use strict";
  var main = document.getElementById("content");
  if (!main || !main.dataset.refresh) {
    return;
  }
  var period = Math.max(1, Number(main.dataset.refresh) || 2) * 1000;
  var busy = false;
  var timer = null;

  // Not while the reader is about to press a button of the page.
  function usingAForm() {
    var active = document.activeElement;
    return active && active.form && main.contains(active);
  }

  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("content");
    if (!fresh) {
      return;
    }
    main.innerHTML = fresh.innerHTML;
    main.classList.remove("stale");
    if (!fresh.dataset.refresh) {
      // It ended: nothing more will move.
      delete main.dataset.refresh;
      clearInterval(timer);
    }
  }

  function refresh() {
    if (busy || document.hidden || usingAForm()) {
      return;
    }
    busy = true;
    fetch(window.location.href, {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (response.redirected) {
          // Signed out (a revoked key, an expired session): show where the server sent us.
          window.location.assign(response.url);
          return null;
        }
        if (!response.ok) {
          main.classList.add("stale");
          return null;
        }
        return response.text();
      })
      .then(function (html) {
        if (html) {
          swap(html);
        }
      })
      .catch(function () {
        main.classList.add("stale");
      })
      .then(function () {
        busy = false;
      });
  }

  timer = setInterval(refresh, period);
})();
